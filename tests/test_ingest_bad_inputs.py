"""Bad input always gives a typed ml.errors.InputError (a 4xx), never another exception or a hang."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from fixtures_ingest import (
    LIMITS,
    dicom_bytes,
    gradient,
    jpeg_bytes,
    marker_image,
    png_bomb,
    png_bytes,
)
from PIL import Image, ImageFile

from ml.errors import (
    CorruptImage,
    EmptyInput,
    InputError,
    InputTooLarge,
    UnsupportedFormat,
)
from ml.image import XRayImage
from ml.ingest import load_image


def load(data: bytes, **kw):
    return load_image(data, **{**LIMITS, **kw})


def _pil_bytes(fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(marker_image()).convert("RGB").save(buf, format=fmt, **save)
    return buf.getvalue()


def test_empty():
    with pytest.raises(EmptyInput) as err:
        load(b"")
    assert err.value.http_status == 400


def test_over_byte_limit():
    data = png_bytes(Image.fromarray(marker_image()))
    with pytest.raises(InputTooLarge) as err:
        load(data, max_bytes=len(data) - 1)
    assert err.value.http_status == 413
    assert isinstance(load(data, max_bytes=len(data)), XRayImage)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" * 3, "PDF"),
        (_pil_bytes("GIF"), "GIF"),
        (_pil_bytes("TIFF"), "TIFF"),
        (_pil_bytes("BMP"), "BMP"),
        (_pil_bytes("WEBP"), "WebP"),
        (b"PK\x03\x04" + b"\x00" * 100, "ZIP"),
        (b"<html><body>hello</body></html>", "HTML"),
        (b'{"resourceType": "Patient"}', "JSON"),
    ],
    ids=["pdf", "gif", "tiff", "bmp", "webp", "zip", "html", "json"],
)
def test_other_formats_unsupported(data, named):
    with pytest.raises(UnsupportedFormat) as err:
        load(data, filename="upload.png")
    msg = str(err.value)
    assert named in msg and "Accepted formats: DICOM" in msg and "PNG or JPEG" in msg
    assert err.value.http_status == 415


def test_text_named_dcm():
    text = b"This is not a DICOM file.\nPatientName: Doe^John\n" * 20
    with pytest.raises(UnsupportedFormat, match=r"plain text \('scan.dcm'\), not an image"):
        load(text, filename="scan.dcm")


def test_random_bytes():
    rng = np.random.default_rng(1234)
    for i in range(20):
        data = rng.integers(0, 256, size=2000, dtype=np.uint8).tobytes()
        with pytest.raises(UnsupportedFormat):
            load(data, filename="x.dcm")
    # Random bytes that happen to start like a bare DICOM dataset (group 0x0008) still fail cleanly.
    for i in range(20):
        data = b"\x08\x00" + rng.integers(0, 256, size=2000, dtype=np.uint8).tobytes()
        with pytest.raises(UnsupportedFormat):
            load(data)


def test_truncated_png():
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    with pytest.raises(CorruptImage):
        load(data[: len(data) // 2])


def test_truncated_png_refused_even_if_pil_allows_truncation(monkeypatch):
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(CorruptImage, match="truncated"):
        load(data[: len(data) // 2])


def test_truncated_jpeg():
    data = jpeg_bytes(Image.fromarray(marker_image(256, 256)), quality=95)
    with pytest.raises(CorruptImage):
        load(data[: len(data) // 2])
    with pytest.raises(CorruptImage):
        load(data[:20])  # inside the header


def test_truncated_dicom():
    data = dicom_bytes(gradient(rows=128, cols=128), bits_stored=12)
    with pytest.raises(CorruptImage):
        load(data[: len(data) - 5000])  # pixel data cut short
    with pytest.raises(InputError):
        load(data[:200])  # cut in the header


def test_png_decompression_bomb_refused_before_decode():
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < 100_000  # tiny file, 400 megapixels
    start = time.perf_counter()
    with pytest.raises(InputTooLarge, match="20000x20000"):
        load(bomb)
    assert time.perf_counter() - start < 0.5  # decoding 400 Mpx would take seconds


def test_pixel_limit_png_and_jpeg():
    png = png_bytes(Image.fromarray(marker_image(100, 100)))
    jpg = jpeg_bytes(Image.fromarray(marker_image(100, 100)))
    for data in (png, jpg):
        with pytest.raises(InputTooLarge, match="100x100"):
            load(data, max_pixels=9999)
        assert load(data, max_pixels=10000).pixels.shape == (100, 100)


def test_jpeg_header_claiming_huge_size():
    data = bytearray(jpeg_bytes(Image.fromarray(marker_image(64, 48))))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    with pytest.raises(InputTooLarge):
        load(bytes(data))


def test_garbage_after_dicm_marker():
    rng = np.random.default_rng(7)
    data = b"\x00" * 128 + b"DICM" + rng.integers(0, 256, size=4000, dtype=np.uint8).tobytes()
    with pytest.raises(InputError):
        load(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the corrupted tags
@pytest.mark.parametrize("kind", ["png", "jpeg", "dicom"])
def test_damaged_files_only_raise_typed_errors(kind):
    """Cut and corrupt valid files at many places: either a decoded image or an InputError."""
    rng = np.random.default_rng({"png": 1, "jpeg": 2, "dicom": 3}[kind])
    arr = marker_image(96, 80)
    if kind == "png":
        good = png_bytes(Image.fromarray(arr))
    elif kind == "jpeg":
        good = jpeg_bytes(Image.fromarray(arr), quality=90)
    else:
        good = dicom_bytes(gradient(rows=80, cols=96), bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    variants = [good[:n] for n in rng.integers(1, len(good), size=15)]
    for _ in range(25):
        damaged = bytearray(good)
        for pos in rng.integers(0, len(good), size=int(rng.integers(1, 8))):
            damaged[pos] = int(rng.integers(0, 256))
        variants.append(bytes(damaged))
    for data in variants:
        try:
            out = load(data)
        except InputError:
            continue
        assert isinstance(out, XRayImage)
        assert out.pixels.dtype == np.float32 and out.pixels.ndim == 2
        assert np.isfinite(out.pixels).all()
