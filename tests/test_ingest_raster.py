"""PNG / JPEG ingestion: modes, bit depth, alpha, colour, EXIF orientation, reduced decoding."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from fixtures_ingest import (
    LIMITS,
    insert_png_chunk,
    jpeg_bytes,
    marker_image,
    png_bytes,
    with_exif_orientation,
)
from PIL import Image

from ml.ingest import load_image


def load(data: bytes, **kw):
    return load_image(data, **{**LIMITS, **kw})


def bright_corner(p: np.ndarray) -> str:
    """Which quadrant holds the bright marker."""
    h, w = p.shape
    quads = {
        "top-left": p[: h // 2, : w // 2],
        "top-right": p[: h // 2, w // 2 :],
        "bottom-left": p[h // 2 :, : w // 2],
        "bottom-right": p[h // 2 :, w // 2 :],
    }
    return max(quads, key=lambda k: quads[k].mean())


# --- PNG ---------------------------------------------------------------------------------------


def test_png_l_exact():
    arr = marker_image()
    img = load(png_bytes(Image.fromarray(arr)))
    np.testing.assert_allclose(img.pixels, arr / 255.0, atol=1e-6)
    m = img.metadata
    assert (m.source_format, m.width, m.height, m.photometric, m.bits_stored) == ("png", 64, 48, "L", 8)
    assert m.extra["colorfulness"] == "0" and m.extra["decode_scale"] == "1"
    assert img.pixels.dtype == np.float32


def test_png_la_composited_over_black():
    gray = np.full((10, 10), 200, np.uint8)
    alpha = np.full((10, 10), 255, np.uint8)
    alpha[:, :5] = 0
    alpha[0, 9] = 128
    img = load(png_bytes(Image.fromarray(np.stack([gray, alpha], -1), mode="LA")))
    p = img.pixels
    assert np.all(p[:, :5] == 0.0)
    assert p[5, 7] == pytest.approx(200 / 255, abs=1e-6)
    assert p[0, 9] == pytest.approx(200 / 255 * 128 / 255, abs=1e-6)
    assert img.metadata.photometric == "LA"


def test_png_16bit_full_range_not_truncated():
    arr = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    data = png_bytes(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    img = load(data)
    np.testing.assert_allclose(img.pixels, arr / 65535.0, atol=1e-6)
    assert len(np.unique(img.pixels)) > 1000  # 8-bit truncation would leave at most 256 levels
    assert img.metadata.bits_stored == 16 and img.metadata.photometric == "I;16"


def test_png_12bit_in_16_scaled_by_used_depth():
    arr = np.linspace(0, 4095, 64 * 48).reshape(48, 64).astype(np.uint16)
    img = load(png_bytes(Image.fromarray(arr)))
    np.testing.assert_allclose(img.pixels, arr / 4095.0, atol=1e-6)
    assert img.metadata.bits_stored == 12
    assert img.pixels[0, 1] > img.pixels[0, 0]  # neighbouring 12-bit levels stay distinct


def test_png_16bit_sbit_chunk_respected():
    arr = np.linspace(0, 2000, 64 * 48).reshape(48, 64).astype(np.uint16)
    data = insert_png_chunk(png_bytes(Image.fromarray(arr)), b"sBIT", bytes([14]))
    img = load(data)
    np.testing.assert_allclose(img.pixels, arr / 16383.0, atol=1e-6)
    assert img.metadata.bits_stored == 14


def test_png_rgb_luminance_and_colorfulness():
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    img = load(png_bytes(Image.fromarray(rgb)))
    np.testing.assert_allclose(img.pixels, (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255, atol=1e-5)
    assert float(img.metadata.extra["colorfulness"]) == pytest.approx(150 / 255, abs=1e-3)
    gray_rgb = np.stack([marker_image()] * 3, -1)
    grey = load(png_bytes(Image.fromarray(gray_rgb)))
    assert float(grey.metadata.extra["colorfulness"]) == 0.0
    np.testing.assert_allclose(grey.pixels, marker_image() / 255.0, atol=1e-5)


def test_png_rgba_transparent_is_black():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = 180
    rgba[..., 3] = 255
    rgba[:3, :3, 3] = 0
    img = load(png_bytes(Image.fromarray(rgba)))
    assert np.all(img.pixels[:3, :3] == 0.0)
    assert img.pixels[5, 5] == pytest.approx(180 / 255, abs=1e-5)
    assert img.metadata.photometric == "RGBA"


def test_png_palette_and_palette_transparency():
    arr = marker_image()
    pal_img = Image.fromarray(arr).convert("P")  # grey values through a palette
    img = load(png_bytes(pal_img))
    np.testing.assert_allclose(img.pixels, arr / 255.0, atol=1.5 / 255)
    assert img.metadata.photometric == "P"

    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 230, 230, 230, 100, 100, 100] + [0] * (256 * 3 - 9))
    p.putpixel((0, 0), 2)
    data = png_bytes(p, transparency=2)  # index 2 is fully transparent
    img = load(data)
    assert img.pixels[0, 0] == 0.0
    assert img.pixels[4, 4] == pytest.approx(230 / 255, abs=1e-5)


# --- JPEG --------------------------------------------------------------------------------------


def test_jpeg_l():
    arr = marker_image(128, 96)
    img = load(jpeg_bytes(Image.fromarray(arr), quality=95))
    assert np.abs(img.pixels - arr / 255.0).mean() < 0.01
    m = img.metadata
    assert (m.source_format, m.width, m.height, m.photometric) == ("jpeg", 128, 96, "L")


def test_jpeg_rgb_grey_content():
    arr = marker_image(128, 96)
    img = load(jpeg_bytes(Image.fromarray(np.stack([arr] * 3, -1)), quality=95))
    assert np.abs(img.pixels - arr / 255.0).mean() < 0.02
    assert float(img.metadata.extra["colorfulness"]) < 0.01


def test_jpeg_cmyk():
    arr = marker_image(64, 48)
    data = jpeg_bytes(Image.fromarray(arr).convert("CMYK"), quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = load(data)
    assert img.metadata.photometric == "CMYK"
    assert bright_corner(img.pixels) == "top-left"
    assert np.abs(img.pixels - arr / 255.0).mean() < 0.03


def test_jpeg_progressive_matches_baseline():
    arr = marker_image(128, 96)
    base = load(jpeg_bytes(Image.fromarray(arr), quality=90))
    data = jpeg_bytes(Image.fromarray(arr), quality=90, progressive=True)
    assert Image.open(io.BytesIO(data)).info.get("progressive")
    prog = load(data)
    assert np.abs(prog.pixels - base.pixels).max() < 0.02


@pytest.mark.parametrize(
    ("orientation", "corner", "swapped"),
    [(1, "top-left", False), (3, "bottom-right", False), (6, "top-right", True), (8, "bottom-left", True)],
)
def test_jpeg_exif_orientation_applied(orientation, corner, swapped):
    arr = marker_image(96, 64)  # stored: wide, marker top-left
    img = load(with_exif_orientation(Image.fromarray(arr), orientation, quality=95))
    assert bright_corner(img.pixels) == corner
    expected_shape = (96, 64) if swapped else (64, 96)
    assert img.pixels.shape == expected_shape
    assert (img.metadata.height, img.metadata.width) == expected_shape


def test_jpeg_target_size_uses_reduced_decoding():
    arr = np.tile(np.linspace(0, 255, 2000), (1600, 1)).astype(np.uint8)
    data = jpeg_bytes(Image.fromarray(arr), quality=90)
    full = load(data)
    assert full.pixels.shape == (1600, 2000) and full.metadata.extra["decode_scale"] == "1"
    small = load(data, target_size=224)
    h, w = small.pixels.shape
    assert min(h, w) >= 2 * 224 and min(h, w) < 1600
    assert float(small.metadata.extra["decode_scale"]) == pytest.approx(w / 2000)
    assert (small.metadata.width, small.metadata.height) == (2000, 1600)  # original size kept
    # Same picture, just smaller.
    assert abs(small.pixels.mean() - full.pixels.mean()) < 0.01
    # A target close to the image size does not reduce.
    assert load(data, target_size=700).pixels.shape == (1600, 2000)


# --- real files --------------------------------------------------------------------------------


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_real_kermany_fullres(shared_data):
    folder = shared_data / "kermany_fullres"
    rows = _rows(folder / "labels.csv")
    assert rows
    for row in rows:
        img = load((folder / row["file"]).read_bytes(), filename=row["file"])
        m = img.metadata
        assert (m.width, m.height) == (int(row["width"]), int(row["height"])), row["file"]
        assert img.pixels.shape == (m.height, m.width)
        assert m.source_format == "jpeg" and m.photometric == row["mode"]
        assert float(m.extra["colorfulness"]) < 0.05, row["file"]  # grey radiographs, even in RGB
        assert 0.05 < img.pixels.std() and 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0


def test_real_nih_fullres_rgba(shared_data):
    folder = shared_data / "nih_cxr14_fullres"
    rows = _rows(folder / "labels.csv")
    modes = set()
    for row in rows:
        img = load((folder / row["file"]).read_bytes())
        m = img.metadata
        modes.add(m.photometric)
        assert (m.width, m.height) == (1024, 1024) and m.photometric == row["mode"]
        assert float(m.extra["colorfulness"]) < 0.02
        # Opaque alpha: not darkened to black by compositing.
        assert img.pixels.mean() > 0.2 and img.pixels.std() > 0.05
    assert "RGBA" in modes
