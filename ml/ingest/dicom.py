"""DICOM decoding: header checks before pixel decode, Modality LUT -> VOI LUT -> MONOCHROME1 inversion.

Compressed transfer syntaxes are decoded by whatever pydicom 3 plugin is installed (gdcm,
pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls, Pillow). pylibjpeg-libjpeg (GPLv3) is not used.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGExtended12Bit,
)

from ml.errors import CorruptImage, InputTooLarge, UnsupportedDicom, UnsupportedFormat
from ml.image import XRayImage
from ml.ingest import voi
from ml.ingest.dicom_checks import check_supported
from ml.ingest.dicom_meta import build_metadata
from ml.ingest.sniff import describe_unknown

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def load_dicom(
    data: bytes,
    *,
    max_pixels: int,
    has_marker: bool,
    filename: str | None = None,
    target_size: int | None = None,
) -> XRayImage:
    # target_size is accepted for symmetry with the raster path but not used: no DICOM decoder
    # offers a cheap reduced-scale decode, and full decode + LUTs of an 8 Mpx DX is ~30 ms.
    del target_size
    ds = _read(data, has_marker=has_marker, filename=filename)
    check_supported(ds)
    rows, cols = _dims(ds)
    if rows * cols > max_pixels:
        raise InputTooLarge(
            f"DICOM image is {cols}x{rows} = {rows * cols:,} pixels, over the limit of "
            f"{max_pixels:,} pixels."
        )
    inferred_ts = _ensure_transfer_syntax(ds)
    raw = _decode(ds, data)
    pixels, extra = _to_display(raw, ds)
    if inferred_ts:
        extra["transfer_syntax_inferred"] = "true"
    if pixels.shape != (rows, cols):
        raise CorruptImage(f"DICOM pixel data decoded to {pixels.shape}, expected {(rows, cols)}.")
    meta = build_metadata(ds, rows=rows, cols=cols, extra=extra)
    return XRayImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), metadata=meta)


def _read(data: bytes, *, has_marker: bool, filename: str | None) -> Dataset:
    if data.startswith(b"DICM"):
        data = bytes(128) + data  # marker written without the 128-byte preamble
    if has_marker and DeflatedExplicitVRLittleEndian.encode() in data[:2048]:
        # pydicom inflates the whole dataset in memory before anything can be checked, so a
        # deflated file is a zip bomb vector; it is also practically never used for images.
        raise UnsupportedDicom(
            "Deflated DICOM transfer syntax is not supported; send it uncompressed or with "
            "JPEG / JPEG 2000 / JPEG-LS / RLE compression."
        )
    try:
        # No warnings.catch_warnings() here or below: it swaps process-wide filters and is not
        # thread-safe under a threaded server; pydicom's warnings on odd files are harmless.
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many kinds for damaged input
        if not has_marker:
            raise UnsupportedFormat(describe_unknown(data, filename)) from exc
        raise CorruptImage(f"DICOM file could not be parsed: {exc}") from exc
    if not has_marker and not _looks_like_dicom(ds):
        raise UnsupportedFormat(describe_unknown(data, filename))
    return ds


def _looks_like_dicom(ds: Dataset) -> bool:
    """A forced parse of arbitrary bytes 'succeeds' with junk tags; demand real structure."""
    try:
        sop = str(ds.get("SOPClassUID", "") or "")
        if sop and _UID_RE.match(sop):
            return True
        rows, cols = ds.get("Rows"), ds.get("Columns")
        return (
            "PixelData" in ds
            and isinstance(rows, int)
            and isinstance(cols, int)
            and rows > 0
            and cols > 0
        )
    except Exception:
        return False


def _dims(ds: Dataset) -> tuple[int, int]:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception as exc:
        raise CorruptImage("DICOM image has no valid Rows/Columns.") from exc
    if rows <= 0 or cols <= 0:
        raise CorruptImage(f"DICOM image has invalid size {cols}x{rows}.")
    return rows, cols


def _ensure_transfer_syntax(ds: Dataset) -> bool:
    """Files without file meta (ACR-NEMA style) need a transfer syntax for pixel decoding.

    Use the encoding the parser actually detected; that is implicit VR little endian for the
    classic preamble-less files.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return False
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if little is False:
        meta.TransferSyntaxUID = ExplicitVRBigEndian
    elif implicit is False:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return True


def _decode(ds: Dataset, data: bytes) -> np.ndarray:
    ts = ds.file_meta.get("TransferSyntaxUID")
    ts_name = getattr(ts, "name", None) or str(ts)
    try:
        # pydicom 3 masks bits above BitsStored and sign-extends signed data here.
        return ds.pixel_array
    except MemoryError as exc:
        raise InputTooLarge("DICOM pixel data is too large to decode.") from exc
    except NotImplementedError as exc:
        # No installed plugin handles this transfer syntax (or pydicom refused the combination).
        if ts == JPEGExtended12Bit and int(ds.get("BitsStored") or 8) > 8:
            return _gdcm_fallback(ds, data, exc)
        raise UnsupportedDicom(
            f"DICOM transfer syntax '{ts_name}' cannot be decoded here ({_first_line(exc)}). "
            "Send it uncompressed or with JPEG / JPEG 2000 / JPEG-LS / RLE compression."
        ) from exc
    except Exception as exc:
        if ts == JPEGExtended12Bit and int(ds.get("BitsStored") or 8) > 8:
            return _gdcm_fallback(ds, data, exc)
        raise CorruptImage(
            f"DICOM pixel data ({ts_name}) could not be decoded: {_first_line(exc)} "
            f"{_plugin_errors(exc)}".strip()
        ) from exc


def _gdcm_fallback(ds: Dataset, data: bytes, first: BaseException) -> np.ndarray:
    from ml.ingest.dicom_gdcm import decode_with_gdcm

    try:
        return decode_with_gdcm(
            data,
            rows=int(ds.Rows),
            cols=int(ds.Columns),
            samples=int(ds.get("SamplesPerPixel") or 1),
            bits_stored=int(ds.get("BitsStored") or 12),
            signed=int(ds.get("PixelRepresentation") or 0) == 1,
        )
    except Exception as exc:
        raise CorruptImage(
            f"12-bit JPEG Extended DICOM pixel data could not be decoded: {_first_line(exc)}"
        ) from first


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _plugin_errors(exc: BaseException) -> str:
    """pydicom lists each plugin's failure on the following lines; keep them short."""
    lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
    return ("(" + "; ".join(lines)[:300] + ")") if lines else ""


def _to_display(raw: np.ndarray, ds: Dataset) -> tuple[np.ndarray, dict[str, str]]:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper()
    bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    extra: dict[str, str] = {"decode_scale": "1"}

    if photometric == "PALETTE COLOR":
        raw = apply_color_lut(raw, ds)
        photometric = "RGB"
        bits_stored = voi.bits_for(float(raw.max()) if raw.size else 255)
    if raw.ndim == 3:
        # pydicom returns RGB for RGB and YBR_* (converted) alike; J2K/JPEG decoders undo YBR_ICT/RCT.
        max_value = float(2**bits_stored - 1)
        extra["colorfulness"] = f"{voi.colorfulness(raw, max_value):.4f}"
        extra["voi"] = "none (colour image, luminance)"
        return voi.luminance(raw, max_value), extra

    extra["colorfulness"] = "0"
    arr, modality_note = _modality(raw, ds)
    extra["modality_lut"] = modality_note
    voi_note = _apply_voi(arr, ds, bits_stored=bits_stored, identity_modality=modality_note == "identity")
    extra["voi"] = voi_note
    # After windowing: the window is defined on stored values, inversion is display only.
    # MONOCHROME2 with Presentation LUT Shape INVERSE is also meant to be shown inverted.
    shape = str(ds.get("PresentationLUTShape", "") or "").upper()
    if photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE"):
        np.subtract(np.float32(1.0), arr, out=arr)
        extra["inverted"] = "true"
    return arr, extra


def _modality(raw: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    seq = ds.get("ModalityLUTSequence")
    if seq:
        # pydicom's apply_modality_lut fails on 10-15 bit LUT descriptors ('uint12'), so the
        # lookup is done here.
        return _lut_lookup(raw, seq[0]), "lut"
    arr = raw.astype(np.float32)
    slope = _float(ds.get("RescaleSlope"), 1.0)
    intercept = _float(ds.get("RescaleIntercept"), 0.0)
    if slope == 0.0:
        slope = 1.0  # a zero slope is a broken header, not an instruction to blank the image
    if slope != 1.0:
        arr *= np.float32(slope)
    if intercept != 0.0:
        arr += np.float32(intercept)
    return arr, ("identity" if slope == 1.0 and intercept == 0.0 else f"rescale {slope:g},{intercept:g}")


def _apply_voi(arr: np.ndarray, ds: Dataset, *, bits_stored: int, identity_modality: bool) -> str:
    """Map modality values in place to [0, 1]; return a note on what was used."""
    seq = ds.get("VOILUTSequence")
    if seq:
        try:
            _voi_lut_inplace(arr, seq[0])
            return "voi_lut"
        except Exception:
            pass  # a malformed LUT falls through to the window or robust range
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if voi.valid_window(center, width, function):
        voi.window_inplace(arr, center, width, function)  # type: ignore[arg-type]
        return f"window {center:g}/{width:g} {function}"
    if identity_modality and bits_stored <= 8:
        # 8-bit data without a window is an already-rendered image (secondary capture of a
        # display); stretching it would change what the radiologist saw.
        voi.scale_inplace(arr, 0.0, float(2**bits_stored - 1))
        return f"bit depth {bits_stored}"
    lo, hi = voi.robust_range(arr)
    voi.scale_inplace(arr, lo, hi)
    return f"percentile {lo:g}..{hi:g}"


def _voi_lut_inplace(arr: np.ndarray, item: Dataset) -> None:
    """Apply a VOI LUT Sequence item (PS3.3 C.11.2.1.1) and scale its output to [0, 1]."""
    out = _lut_lookup(arr, item)
    nominal_bits = int(item.LUTDescriptor[2])
    # Several vendors declare 16-bit entries and use 12; scale by the depth actually used.
    top = float(out.max()) if out.size else 0.0
    lut_max = max(top, float(np.max(_lut_values(item))))
    denom = float(2 ** voi.bits_for(lut_max, minimum=min(nominal_bits, 8)) - 1)
    np.multiply(out, np.float32(1.0 / denom), out=arr)


def _lut_values(item: Dataset) -> np.ndarray:
    n_entries = int(item.LUTDescriptor[0]) or 65536
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        # OW: 16-bit words (8-bit LUTs are also stored one entry per word).
        lut = np.frombuffer(bytes(data)[: 2 * n_entries], dtype="<u2")
    elif isinstance(data, (int, float)):
        lut = np.asarray([data])
    else:
        lut = np.asarray(list(data))
    if lut.size == 0:
        raise ValueError("empty LUT")
    return lut.astype(np.float32)


def _lut_lookup(arr: np.ndarray, item: Dataset) -> np.ndarray:
    """Look stored/modality values up in a LUT item: below first-mapped -> first entry, above
    the table -> last entry. Indices are int64 (pydicom's apply_voi uses the LUT's own dtype
    for them, which wraps for an 8-bit LUT with more than 256 entries).
    """
    first_map = int(item.LUTDescriptor[1])
    lut = _lut_values(item)
    idx = np.rint(arr).astype(np.int64) if arr.dtype.kind == "f" else arr.astype(np.int64)
    idx -= first_map
    np.clip(idx, 0, lut.size - 1, out=idx)
    return lut[idx]


def _first(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        seq = list(value)  # type: ignore[arg-type]
        if not seq:
            return None
        value = seq[0]
    return _float(value, None)


def _float(value: object, default: float | None) -> float | None:  # type: ignore[return]
    if value is None or value == "":
        return default
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


@dataclass(frozen=True)
class StoredValues:
    """A DICOM image before any VOI: what a viewer's window/level acts on.

    `values` are Modality-LUT output (float32, H x W; colour images as luminance in 0..255),
    `inverted` says higher values are displayed darker (MONOCHROME1 or INVERSE presentation),
    `window` is the header's first linear (center, width) when valid.
    """

    values: np.ndarray
    inverted: bool
    window: tuple[float, float] | None


def load_dicom_values(data: bytes, *, max_pixels: int, has_marker: bool) -> StoredValues:
    """Decode like load_dicom (same checks, decoders and Modality LUT) but stop before the VOI."""
    ds = _read(data, has_marker=has_marker, filename=None)
    check_supported(ds)
    rows, cols = _dims(ds)
    if rows * cols > max_pixels:
        raise InputTooLarge(f"DICOM image is {cols}x{rows} pixels, over the limit of {max_pixels:,} pixels.")
    _ensure_transfer_syntax(ds)
    raw = _decode(ds, data)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper()
    if raw.ndim == 3 or photometric == "PALETTE COLOR":
        display, _ = _to_display(raw, ds)
        return StoredValues(np.ascontiguousarray(display * np.float32(255.0)), False, None)
    arr, _ = _modality(raw, ds)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    window = (float(center), float(width)) if voi.valid_window(center, width, "LINEAR") else None  # type: ignore[arg-type]
    shape = str(ds.get("PresentationLUTShape", "") or "").upper()
    inverted = photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE")
    return StoredValues(np.ascontiguousarray(arr, dtype=np.float32), inverted, window)
