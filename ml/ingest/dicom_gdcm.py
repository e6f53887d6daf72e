"""Second-chance decoder: whole-file decode with GDCM when pydicom's plugins refuse a syntax.

pydicom's GDCM plugin rebuilds a bare gdcm.Image per frame and so refuses 12-bit JPEG Extended
(Process 2 & 4), which older CR/DX systems write; GDCM itself decodes it when it reads the whole
file. The only other decoder for it, pylibjpeg-libjpeg, is GPLv3 and deliberately not used.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np


def decode_with_gdcm(data: bytes, *, rows: int, cols: int, samples: int, bits_stored: int,
                     signed: bool) -> np.ndarray:
    """Decoded pixels as (rows, cols[, samples]), masked to bits_stored and sign-extended."""
    import gdcm  # optional import: only needed on this rare path

    fd, path = tempfile.mkstemp(suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(path)
        if not reader.Read():
            raise ValueError("GDCM could not read the file")
        image = reader.GetImage()
        buf = image.GetBuffer()
    finally:
        os.unlink(path)
    raw = buf.encode("utf-8", "surrogateescape") if isinstance(buf, str) else bytes(buf)
    n = rows * cols * samples
    itemsize = len(raw) // n if n else 0
    if itemsize not in (1, 2, 4) or len(raw) < n * itemsize:
        raise ValueError(f"GDCM returned {len(raw)} bytes for {rows}x{cols}x{samples}")
    dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32}[itemsize]
    arr = np.frombuffer(raw[: n * itemsize], dtype=np.dtype(dtype).newbyteorder("<")).astype(np.int64)
    if bits_stored < 8 * itemsize:
        arr &= (1 << bits_stored) - 1
    if signed:
        sign = 1 << (bits_stored - 1)
        arr = np.where(arr & sign, arr - (1 << bits_stored), arr)
    out_dtype = np.int32 if signed else np.uint32
    shape = (rows, cols) if samples == 1 else (rows, cols, samples)
    return arr.astype(out_dtype).reshape(shape)
