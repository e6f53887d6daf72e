"""Server-rendered previews of a stored image with window/level, for the web page's viewer.

GET /web/api/preview/{media_id}?preset=default|lung|bone[&center=C&width=W][&max_side=N] -> PNG

Window/level acts on the values before any VOI (DICOM Modality LUT output), so a 12- or 16-bit
film keeps its full range and a narrow window shows detail the 8-bit default rendering clips.
Chest radiographs (CR/DX) are not calibrated like CT Hounsfield units, so the presets are defined
on the image's own robust value range (0.5th..99.5th percentile), in display-brightness order:

    default  the header's window (DICOM WindowCenter/Width) when present, else the robust range
    lung     the darker 0.05..0.65 of the range: lung parenchyma and vessels get the contrast
    bone     the brighter 0.40..1.00: ribs, spine and mediastinum get it

`center` and `width` (stored-value units, as in DICOM) override the preset. PNG/JPEG films work
the same way on their 0..255 values. The answer carries the window used and the value range in
X-Window-Center, X-Window-Width, X-Value-Min, X-Value-Max, and the original size in
X-Image-Width, X-Image-Height (region boxes are in original pixels).

Decoded images are cached per (Media id, version) in app.state, a few at a time, so dragging a
window does not decode a 16 MB DICOM on every step.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ml.errors import CXRError
from ml.ingest import load_image
from ml.ingest.dicom import load_dicom_values
from ml.ingest.sniff import sniff
from ml.ingest.voi import robust_range

PRESETS: dict[str, tuple[float, float] | None] = {"default": None, "lung": (0.05, 0.65), "bone": (0.40, 1.0)}
CACHE_SIZE = 4
CACHE_MAX_SIDE = 2048  # the largest preview served; a reading monitor's film pane is smaller


class PreviewError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Prepared:
    values: np.ndarray  # float32, long side <= CACHE_MAX_SIDE
    width: int  # original size
    height: int
    inverted: bool
    header_window: tuple[float, float] | None
    low: float  # robust range of the values
    high: float


def prepare(data: bytes, *, max_bytes: int, max_pixels: int) -> Prepared:
    """Decode once into values a window can act on (raises CXRError for unusable images)."""
    fmt = sniff(data)
    if fmt in ("dicom", "dicom?"):
        stored = load_dicom_values(data, max_pixels=max_pixels, has_marker=fmt == "dicom")
        values, inverted, window = stored.values, stored.inverted, stored.window
    else:
        image = load_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
        values, inverted, window = image.pixels * np.float32(255.0), False, None
    height, width = values.shape
    ratio = min(1.0, CACHE_MAX_SIDE / max(height, width))
    if ratio < 1.0:
        size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        values = np.asarray(
            Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F").resize(
                size, Image.Resampling.BOX
            ),
            dtype=np.float32,
        )
    low, high = robust_range(values)
    if high <= low:
        high = low + 1.0
    return Prepared(values, width, height, inverted, window, float(low), float(high))


def choose_window(p: Prepared, preset: str, center: float | None, width: float | None) -> tuple[float, float]:
    if center is not None and width is not None:
        return center, max(width, 1e-6)
    fractions = PRESETS[preset]
    if fractions is None:
        return p.header_window or ((p.low + p.high) / 2, p.high - p.low)
    a, b = fractions
    span = p.high - p.low
    if p.inverted:  # brighter on screen = lower stored value
        lo, hi = p.high - b * span, p.high - a * span
    else:
        lo, hi = p.low + a * span, p.low + b * span
    return (lo + hi) / 2, hi - lo


def render(p: Prepared, center: float, width: float, max_side: int) -> bytes:
    arr = p.values
    h, w = arr.shape
    ratio = min(1.0, max_side / max(h, w))
    if ratio < 1.0:
        size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
        arr = np.asarray(Image.fromarray(arr, mode="F").resize(size, Image.Resampling.BOX), dtype=np.float32)
    lo = center - width / 2
    out = np.clip((arr - np.float32(lo)) / np.float32(width), 0.0, 1.0)
    if p.inverted:
        out = 1.0 - out
    buf = io.BytesIO()
    Image.fromarray((out * 255.0 + 0.5).astype(np.uint8), mode="L").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def headers(p: Prepared, center: float, width: float) -> dict[str, str]:
    return {
        "X-Window-Center": f"{center:.6g}",
        "X-Window-Width": f"{width:.6g}",
        "X-Value-Min": f"{p.low:.6g}",
        "X-Value-Max": f"{p.high:.6g}",
        "X-Image-Width": str(p.width),
        "X-Image-Height": str(p.height),
        "X-Inverted": "true" if p.inverted else "false",
        "Cache-Control": "private, max-age=300",
    }


def parse_number(name: str, raw: str | None) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise PreviewError(400, "invalid_parameter", f"{name} must be a number, not {raw!r}.") from None
    if not math.isfinite(value):
        raise PreviewError(400, "invalid_parameter", f"{name} must be a finite number.")
    return value


class PreviewCache:
    """The last few prepared images, keyed by (Media id, version id)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._items: OrderedDict[tuple[str, str], Prepared] = OrderedDict()
        self._size = size

    def get(self, key: tuple[str, str]) -> Prepared | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: tuple[str, str], value: Prepared) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


def cache_for(state: Any) -> PreviewCache:
    cache = getattr(state, "preview_cache", None)
    if cache is None:
        cache = state.preview_cache = PreviewCache()
    return cache


def decode_error(exc: CXRError) -> PreviewError:
    return PreviewError(422, exc.code, exc.message)
