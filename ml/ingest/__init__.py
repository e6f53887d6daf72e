"""Ingestion: bytes (DICOM, PNG, JPEG) -> XRayImage, or a typed ml.errors.InputError.

The format is decided by magic bytes; a filename is only used in messages and never makes a
file acceptable on its own. Limits are checked from headers before any pixel data is decoded.
"""

from __future__ import annotations

from ml.errors import CorruptImage, CXRError, EmptyInput, InputTooLarge
from ml.image import XRayImage
from ml.ingest.sniff import ACCEPTED, sniff

__all__ = ["ACCEPTED", "load_image"]


def load_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    filename: str | None = None,
    target_size: int | None = None,
) -> XRayImage:
    """Decode one radiograph to float32 (H, W) in [0, 1], 1 = brightest (bone).

    `target_size`: when given, decoders may decode at a reduced scale whose short side is still
    at least 2 * target_size (JPEG DCT scaling); metadata width/height stay the original size and
    metadata.extra["decode_scale"] records the factor applied. Default: full resolution.
    """
    if data is None or len(data) == 0:
        raise EmptyInput("The upload is empty. " + ACCEPTED)
    if len(data) > max_bytes:
        raise InputTooLarge(
            f"The upload is {len(data):,} bytes, over the limit of {max_bytes:,} bytes."
        )
    data = bytes(data)  # accept bytearray/memoryview; every decoder below wants bytes
    try:
        fmt = sniff(data, filename)
        if fmt in ("dicom", "dicom?"):
            from ml.ingest.dicom import load_dicom

            return load_dicom(
                data,
                max_pixels=max_pixels,
                has_marker=fmt == "dicom",
                filename=filename,
                target_size=target_size,
            )
        from ml.ingest.raster import load_raster

        return load_raster(data, fmt, max_pixels=max_pixels, target_size=target_size)
    except CXRError:
        raise
    except MemoryError as exc:
        raise InputTooLarge("The image is too large to decode in memory.") from exc
    except Exception as exc:  # a decoder bug or odd file must still be a 4xx, never a 500
        raise CorruptImage(f"The image could not be decoded: {type(exc).__name__}: {exc}") from exc
