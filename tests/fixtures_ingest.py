"""Builders for synthetic DICOM / PNG / JPEG test inputs (all generated in memory, nothing on disk)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

LIMITS: dict[str, int] = {"max_bytes": 64 * 1024 * 1024, "max_pixels": 50_000_000}


def gradient(rows: int = 64, cols: int = 48, *, lo: int = 0, hi: int = 4095, dtype: Any = np.uint16) -> np.ndarray:
    """Horizontal ramp lo..hi (left dark, right bright) with a bright square marker top-left."""
    ramp = np.linspace(lo, hi, cols)
    arr = np.tile(ramp, (rows, 1))
    arr[4:12, 4:12] = hi
    return np.rint(arr).astype(dtype)


def base_dataset(
    arr: np.ndarray,
    *,
    sop_class: str = CR_STORAGE,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **tags: Any,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TEST-123"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    bits = bits_stored or (8 if arr.dtype.itemsize == 1 else 16)
    ds.set_pixel_data(arr, photometric, bits, generate_instance_uid=False)
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def to_bytes(ds: Dataset, *, preamble: bool = True) -> bytes:
    buf = io.BytesIO()
    if preamble:
        ds.save_as(buf, enforce_file_format=True)
    else:
        # ACR-NEMA style: bare dataset, implicit VR little endian, no preamble, no file meta.
        bare = Dataset()
        bare.update(ds)
        bare.save_as(buf, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def dicom_bytes(arr: np.ndarray, **kwargs: Any) -> bytes:
    preamble = kwargs.pop("preamble", True)
    return to_bytes(base_dataset(arr, **kwargs), preamble=preamble)


def jpeg_baseline_dicom(arr8: np.ndarray, *, quality: int = 95, **tags: Any) -> bytes:
    """A JPEG Baseline (Process 1) DICOM: Pillow encodes, pydicom encapsulates."""
    ds = base_dataset(arr8, **tags)
    buf = io.BytesIO()
    Image.fromarray(arr8).save(buf, format="JPEG", quality=quality)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    if ds.PhotometricInterpretation == "RGB" and arr8.ndim == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    return to_bytes(ds)


def compressed_dicom(arr: np.ndarray, transfer_syntax: str, **kwargs: Any) -> bytes:
    ds = base_dataset(arr, **kwargs)
    ds.compress(transfer_syntax, generate_instance_uid=False)
    return to_bytes(ds)


def implicit_dicom(arr: np.ndarray, **kwargs: Any) -> bytes:
    ds = base_dataset(arr, **kwargs)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return to_bytes(ds)


def png_bytes(im: Image.Image, **save: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, **save: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **save)
    return buf.getvalue()


def marker_image(width: int = 64, height: int = 48) -> np.ndarray:
    """8-bit dark image with a bright block in the top-left corner (to track orientation)."""
    arr = np.full((height, width), 20, dtype=np.uint8)
    arr[2:14, 2:14] = 240
    return arr


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    import zlib

    return (
        len(payload).to_bytes(4, "big")
        + ctype
        + payload
        + zlib.crc32(ctype + payload).to_bytes(4, "big")
    )


def insert_png_chunk(png: bytes, ctype: bytes, payload: bytes) -> bytes:
    """Insert an ancillary chunk right after IHDR (signature 8 + IHDR 25 bytes)."""
    return png[:33] + png_chunk(ctype, payload) + png[33:]


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height zeros, a few kilobytes long."""
    import zlib

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    chunks = [comp.compress(row * 1000) for _ in range(height // 1000)]
    chunks.append(comp.compress(row * (height % 1000)))
    chunks.append(comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"".join(chunks))
        + png_chunk(b"IEND", b"")
    )


def with_exif_orientation(im: Image.Image, orientation: int, **save: Any) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(im, exif=exif.tobytes(), **save)


def gdcm_transcode(data: bytes, syntax: str) -> bytes:
    """Re-encode a DICOM file with GDCM (for syntaxes pydicom cannot encode: JPEG Lossless,
    12-bit JPEG Extended). `syntax` is a gdcm.TransferSyntax attribute name."""
    import os
    import tempfile

    import gdcm

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.dcm"), os.path.join(tmp, "out.dcm")
        with open(src, "wb") as fh:
            fh.write(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(src)
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(dst)
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        with open(dst, "rb") as fh:
            return fh.read()
