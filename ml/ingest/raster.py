"""PNG and JPEG decoding with Pillow: size checked from the header before the pixels are decoded.

Colour images become BT.601 luminance. Transparent pixels are composited over black: in a
display-ready radiograph black is air / no signal, so a transparent border reads as background
instead of turning into bright "bone" (over white) that would distort windowing and the model.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ml.errors import CorruptImage, InputTooLarge
from ml.image import ImageMetadata, XRayImage
from ml.ingest import voi
from ml.ingest.header import header_size

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
_GREY_8BIT = {"1", "L", "LA", "La"}
_GREY_WIDE = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def load_raster(
    data: bytes,
    fmt: str,
    *,
    max_pixels: int,
    target_size: int | None = None,
) -> XRayImage:
    size = header_size(data, fmt)
    if size is not None:
        _check_size(*size, fmt=fmt, max_pixels=max_pixels)
    im = _open(data, fmt)
    width, height = im.size  # header only so far: nothing decoded yet
    _check_size(width, height, fmt=fmt, max_pixels=max_pixels)
    original_mode = im.mode
    scale = _maybe_draft(im, fmt, target_size)
    _load(im, data, fmt)
    orientation = _orientation(im)
    if orientation != 1:
        im = _exif_transpose(im)
        extra_orient = {"exif_orientation": str(orientation)}
    else:
        extra_orient = {}
    pixels, extra, bits = _to_gray(im, sbit=_png_sbit(data) if fmt == "png" else None)
    extra.update(extra_orient)
    extra["decode_scale"] = f"{scale:g}"
    # Pixels are upright after the EXIF transpose, so report the upright original dimensions.
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    meta = ImageMetadata(
        source_format=fmt,
        width=width,
        height=height,
        photometric=original_mode,
        bits_stored=bits,
        extra=extra,
    )
    return XRayImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), metadata=meta)


def _check_size(width: int, height: int, *, fmt: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImage(f"{fmt.upper()} header gives an invalid size {width}x{height}.")
    if width * height > max_pixels:
        raise InputTooLarge(
            f"{fmt.upper()} image is {width}x{height} = {width * height:,} pixels, over the limit "
            f"of {max_pixels:,} pixels. Send a smaller image."
        )


def _open(data: bytes, fmt: str) -> Image.Image:
    try:
        # Our pixel limit was checked from the header already; Pillow's own bomb check (a
        # process-wide setting, left alone) only fires for limits configured above ~89 Mpx.
        return Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]])
    except Image.DecompressionBombError as exc:
        raise InputTooLarge(f"{fmt.upper()} image is far over the pixel limit ({exc}).") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptImage(f"{fmt.upper()} header could not be read: {exc}") from exc


def _maybe_draft(im: Image.Image, fmt: str, target_size: int | None) -> float:
    """JPEG DCT-domain downscale (1/2, 1/4, 1/8) keeping the short side >= 2 * target_size."""
    if fmt != "jpeg" or not target_size or target_size <= 0:
        return 1.0
    w, h = im.size
    factor = (2 * target_size) / min(w, h)
    if factor >= 0.5:
        return 1.0  # draft cannot reduce by less than 2x
    want = (math.ceil(w * factor), math.ceil(h * factor))
    mode = im.mode if im.mode in ("L", "RGB") else None
    try:
        im.draft(mode, want)
    except (OSError, ValueError):
        return 1.0
    return im.size[0] / w


def _load(im: Image.Image, data: bytes, fmt: str) -> None:
    # Do not trust a process-wide LOAD_TRUNCATED_IMAGES=True set by some other library: a
    # truncated upload must be refused, not silently padded with grey.
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _has_end_marker(data, fmt):
        raise CorruptImage(f"{fmt.upper()} file is truncated (no end marker).")
    try:
        im.load()
    except MemoryError as exc:
        raise InputTooLarge(f"{fmt.upper()} image is too large to decode.") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise CorruptImage(f"{fmt.upper()} image data is damaged or truncated: {exc}") from exc


def _has_end_marker(data: bytes, fmt: str) -> bool:
    if fmt == "png":
        return b"IEND" in data[-64:]
    return b"\xff\xd9" in data[-1024:]


def _orientation(im: Image.Image) -> int:
    """EXIF Orientation (1 = upright); a broken EXIF block counts as upright."""
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:
        return im  # a broken EXIF block must not make a readable image unusable
    return out if out is not None else im


def _to_gray(im: Image.Image, *, sbit: int | None = None) -> tuple[np.ndarray, dict[str, str], int]:
    """(pixels in [0, 1], extra metadata, significant bits) for any PNG/JPEG mode."""
    mode = im.mode
    if mode in _GREY_WIDE:
        return _wide_gray(im, sbit)
    if mode in _GREY_8BIT:
        arr = np.asarray(im.convert("L") if mode == "1" else im.convert("LA") if mode == "La" else im)
        if arr.ndim == 3:  # LA: grey over black by alpha
            gray = arr[..., 0].astype(np.float32)
            gray *= arr[..., 1].astype(np.float32) * np.float32(1.0 / (255.0 * 255.0))
        else:
            gray = arr.astype(np.float32) * np.float32(1.0 / 255.0)
        return gray, {"colorfulness": "0"}, 8
    if mode == "P":
        has_alpha = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "PA"):
        im = im.convert("RGBA" if mode in ("RGBa", "PA") else "RGB")
    elif mode not in ("RGB", "RGBA"):
        im = im.convert("RGB")
    arr = np.asarray(im)
    rgb = arr[..., :3]
    extra = {"colorfulness": f"{voi.colorfulness(rgb, 255.0):.4f}"}
    gray = voi.luminance(rgb, 255.0)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3]
        if alpha.min() < 255:  # most RGBA radiographs are fully opaque: skip the multiply
            gray *= alpha.astype(np.float32) * np.float32(1.0 / 255.0)
    return gray, extra, 8


def _wide_gray(im: Image.Image, sbit: int | None) -> tuple[np.ndarray, dict[str, str], int]:
    """16/32-bit grey keeps its full range; the divisor is the bit depth actually in use.

    A 12-bit detector image in a 16-bit PNG (max 4095) divided by 65535 would come out almost
    black, so the depth is the PNG sBIT chunk when present, else the smallest that holds max.
    """
    gray = np.asarray(im).astype(np.float32)  # astype also fixes big-endian I;16B
    lo = float(gray.min()) if gray.size else 0.0
    hi = float(gray.max()) if gray.size else 0.0
    extra: dict[str, str] = {"colorfulness": "0"}
    if lo < 0:
        # Signed 32-bit data has no natural zero: stretch its range.
        voi.scale_inplace(gray, lo, hi)
        extra["intensity_scaling"] = f"min/max {lo:g}..{hi:g}"
        return gray, extra, voi.bits_for(hi - lo)
    bits = sbit if sbit and 8 <= sbit <= 16 else voi.bits_for(hi)
    if hi > 2**bits - 1:  # an sBIT chunk that lies about the data must not clip it
        bits = voi.bits_for(hi)
    gray *= np.float32(1.0 / (2**bits - 1))
    np.clip(gray, 0.0, 1.0, out=gray)
    extra["intensity_scaling"] = f"bit depth {bits}"
    return gray, extra, bits


def _png_sbit(data: bytes) -> int | None:
    """Significant bits from the PNG sBIT chunk (Pillow does not expose it when reading)."""
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype = data[pos + 4 : pos + 8]
        if ctype in (b"IDAT", b"IEND"):
            return None
        if ctype == b"sBIT" and length >= 1 and pos + 9 <= len(data):
            return int(data[pos + 8])
        pos += 12 + length
    return None
