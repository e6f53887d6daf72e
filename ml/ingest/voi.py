"""Vectorised float32 intensity transforms (DICOM windowing, robust range) mapping to [0, 1].

All functions work in place on a float32 array where they can: a 3072x2614 radiograph is 8
megapixels and every extra full-size temporary costs ~10 ms on the 2-core target machine.
"""

from __future__ import annotations

import numpy as np

# Sampling ~250k pixels gives percentiles within a fraction of a grey level of the full-image
# value at a fraction of the cost (np.percentile on 8 Mpx takes >100 ms).
_PERCENTILE_SAMPLE = 250_000
# A mean needs far fewer samples than a tail percentile.
_CHROMA_SAMPLE = 65_536


def window_inplace(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing of `arr` (float32, modified in place) to [0, 1].

    LINEAR keeps the standard's half-pixel offsets (so a window of 4096 on 12-bit data is not
    stretched by a fraction), LINEAR_EXACT is the plain ramp, SIGMOID the logistic curve.
    """
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        arr -= np.float32(center)
        arr *= np.float32(-4.0 / width)
        np.exp(arr, out=arr)
        arr += np.float32(1.0)
        np.reciprocal(arr, out=arr)
        return arr
    if function == "LINEAR_EXACT":
        arr -= np.float32(center)
        arr *= np.float32(1.0 / width)
    else:
        arr -= np.float32(center - 0.5)
        # width == 1 is a threshold at center - 0.5; avoid dividing by zero.
        arr *= np.float32(1.0 / max(width - 1.0, 1e-6))
    arr += np.float32(0.5)
    np.clip(arr, 0.0, 1.0, out=arr)
    return arr


def valid_window(center: float | None, width: float | None, function: str) -> bool:
    if center is None or width is None:
        return False
    if not (np.isfinite(center) and np.isfinite(width)):
        return False
    # LINEAR needs width >= 1 (the standard's constraint); the others only width > 0.
    return width >= 1.0 if (function or "LINEAR").upper() == "LINEAR" else width > 0.0


def robust_range(arr: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> tuple[float, float]:
    """Percentile range on a strided subsample; falls back to min/max for near-constant images."""
    step = max(1, int(np.sqrt(arr.size / _PERCENTILE_SAMPLE)))
    sample = arr[::step, ::step] if arr.ndim == 2 else arr.reshape(-1)[:: step * step]
    lo, hi = np.percentile(sample, [low_pct, high_pct])
    if not hi > lo:
        lo, hi = float(np.min(sample)), float(np.max(sample))
    return float(lo), float(hi)


def scale_inplace(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] to [0, 1] with clipping; a constant image becomes all zeros."""
    if not hi > lo:
        arr.fill(0.0)
        return arr
    arr -= np.float32(lo)
    arr *= np.float32(1.0 / (hi - lo))
    np.clip(arr, 0.0, 1.0, out=arr)
    return arr


def luminance(rgb: np.ndarray, max_value: float) -> np.ndarray:
    """ITU-R BT.601 luma (what a grayscale viewer shows) of an (H, W, 3) array, scaled to [0, 1].

    Computed channel by channel into one float32 buffer to avoid an (H, W, 3) float temporary.
    """
    out = rgb[..., 0].astype(np.float32)
    out *= np.float32(0.299 / max_value)
    out += rgb[..., 1].astype(np.float32) * np.float32(0.587 / max_value)
    out += rgb[..., 2].astype(np.float32) * np.float32(0.114 / max_value)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def colorfulness(rgb: np.ndarray, max_value: float) -> float:
    """Mean chroma (max - min channel, in [0, 1]) on a subsample; 0 for a grey image stored as RGB.

    Radiographs saved as RGB are grey (chroma ~0); photos, annotated screenshots and colour
    heat-maps are not, which is why the OOD gate may want this number.
    """
    h, w = rgb.shape[:2]
    step = max(1, int(np.sqrt(h * w / _CHROMA_SAMPLE)))
    sample = rgb[::step, ::step]
    r, g, b = sample[..., 0], sample[..., 1], sample[..., 2]
    # Integer max/min per pixel (no float (H, W, 3) temporary, no strided axis reduction).
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return float(chroma.mean(dtype=np.float64) / max_value)


def bits_for(max_value: float, minimum: int = 8) -> int:
    """Smallest bit depth (>= minimum) that holds max_value, e.g. 4095 -> 12, 900 -> 10."""
    bits = int(np.ceil(np.log2(max(float(max_value), 1.0) + 1.0)))
    return max(minimum, bits)
