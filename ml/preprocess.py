"""XRayImage -> model tensor in TorchXRayVision's convention, plus the geometry to map back.

TorchXRayVision models take one channel scaled to [-1024, 1024], center-cropped to a square and
resized to the model resolution (XRayCenterCrop + XRayResizer). We do the same, with PIL's
antialiased resize on float32 data (one pass, `reducing_gap` for speed on large films), and keep
the crop/scale so heatmap regions can be reported in original pixel coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ml.image import XRayImage

XRV_MAX = 1024.0


@dataclass(frozen=True)
class Transform:
    """Original image -> model input: crop the square at (x0, y0) of side `crop`, scale to `size`."""

    x0: int
    y0: int
    crop: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / self.crop

    def box_to_original(self, box: tuple[float, float, float, float]) -> list[int]:
        """A [x1, y1, x2, y2] box in model-input pixels -> original image pixels (clipped to the crop)."""
        s = self.scale
        x1, y1, x2, y2 = box
        ox1 = int(np.floor(x1 / s)) + self.x0
        oy1 = int(np.floor(y1 / s)) + self.y0
        ox2 = int(np.ceil(x2 / s)) + self.x0
        oy2 = int(np.ceil(y2 / s)) + self.y0
        hi_x, hi_y = self.x0 + self.crop, self.y0 + self.crop
        return [max(ox1, self.x0), max(oy1, self.y0), min(ox2, hi_x), min(oy2, hi_y)]


def center_crop_box(width: int, height: int) -> tuple[int, int, int]:
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def to_model_input(pixels01: np.ndarray, size: int) -> tuple[np.ndarray, Transform]:
    """float [0, 1] (H, W) -> float32 (1, size, size) in [-1024, 1024] and its Transform."""
    h, w = pixels01.shape
    x0, y0, side = center_crop_box(w, h)
    crop = np.ascontiguousarray(pixels01[y0 : y0 + side, x0 : x0 + side], dtype=np.float32)
    if side != size:
        img = Image.fromarray(crop, mode="F")
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        crop = np.asarray(img, dtype=np.float32)
    out = (np.clip(crop, 0.0, 1.0) * (2 * XRV_MAX) - XRV_MAX).astype(np.float32, copy=False)
    return out[None, :, :], Transform(x0=x0, y0=y0, crop=side, size=size)


def preprocess(image: XRayImage, size: int) -> tuple[np.ndarray, Transform]:
    return to_model_input(image.pixels, size)
