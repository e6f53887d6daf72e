"""Grad-CAM explanations: a heat map per finding, regions as boxes in original pixels, PNG overlays.

How the activations and gradients are obtained (see CamCapture): one permanent forward hook on the
model's `cam_layer` replaces, *only in a thread that asked for it*, the layer's output by a fresh
leaf tensor that requires grad. Network parameters are frozen, so autograd records nothing before
the cam layer: the forward pass costs about what an inference-mode pass costs, and each finding's
explanation is one `torch.autograd.grad` through the small head. No hook is added or removed per
call and all per-call state lives in a threading.local, so concurrent calls from a worker pool never
see each other's activations.

CAM equivalence: for a head that is global average pooling + linear layer (+ a monotone sigmoid /
op_norm), d score / d A_k(i, j) = g'(z) * w_ck / (h * w) for every position, so the Grad-CAM weight
alpha_k is proportional to the class weight w_ck and Grad-CAM equals the original CAM of Zhou et al.
(2016) up to a positive factor, which the 0..1 normalisation removes. When the output is saturated
(probability exactly 0 or 1 in float32) the gradient vanishes and no map is produced.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from ml.preprocess import Transform

REGION_LEVEL = 0.5  # a region is where the map is >= half of its maximum
MAX_REGIONS = 3
HEATMAP_MAX_SIDE = 512


class CamCapture:
    """Captures the cam layer's activation as a grad-requiring leaf, per thread, on request."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self._local = threading.local()
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: object, output: object) -> object:
        if not getattr(self._local, "active", False) or not isinstance(output, torch.Tensor):
            return None
        leaf = output.detach().requires_grad_(True)
        self._local.activation = leaf
        # Hand the rest of the network a non-leaf copy: some heads (TorchXRayVision's DenseNet)
        # apply an in-place ReLU next, which autograd forbids on a leaf that requires grad.
        return leaf * 1.0

    @contextmanager
    def capture(self) -> Iterator[threading.local]:
        """Within this block (and thread) a forward pass stores `slot.activation`; grad is enabled."""
        self._local.active = True
        self._local.activation = None
        try:
            with torch.enable_grad():
                yield self._local
        finally:
            self._local.active = False

    def activation(self) -> torch.Tensor | None:
        return getattr(self._local, "activation", None)

    def release(self) -> None:
        """Drop this thread's reference to the last activation (and the graph hanging off it)."""
        self._local.activation = None

    def close(self) -> None:
        self._handle.remove()


def grad_cam(
    score: torch.Tensor, activation: torch.Tensor, size: int, *, retain_graph: bool, row: int = 0
) -> np.ndarray | None:
    """Grad-CAM of a scalar `score` w.r.t. row `row` of `activation` (N, C, h, w), upsampled to
    (size, size), 0..1. In a batch, `score` depends on its own row only (eval-mode layers do not mix
    samples), so the other rows' gradients are zero and are dropped.

    Returns None when the map is empty (vanishing gradient or no positive evidence).
    """
    if not score.requires_grad:
        return None
    (grad,) = torch.autograd.grad(score, activation, retain_graph=retain_graph)
    grad, activation = grad[row : row + 1], activation[row : row + 1]
    with torch.no_grad():
        weights = grad.mean(dim=(2, 3), keepdim=True)  # alpha_k: pooled gradients
        cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        peak = float(cam.max())
        if not np.isfinite(peak) or peak <= 0.0:
            return None
        return (cam / peak).clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)


def cam_regions(
    cam: np.ndarray, transform: Transform, *, level: float = REGION_LEVEL, max_regions: int = MAX_REGIONS
) -> list[list[int]]:
    """Connected areas where cam >= level * max, as [x1, y1, x2, y2] in original pixels, largest first."""
    peak = float(cam.max()) if cam.size else 0.0
    if peak <= 0.0:
        return []
    mask = cam >= level * peak
    # Label only the bounding box of the mask: every component lies inside it, 4-connectivity does
    # not see the crop, and raster order (hence label numbers and the stable tie-break) is kept.
    rows_any, cols_any = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows_any.size == 0:
        return []
    r0, c0 = int(rows_any[0]), int(cols_any[0])
    labelled, count = ndimage.label(mask[r0 : int(rows_any[-1]) + 1, c0 : int(cols_any[-1]) + 1])
    if count == 0:
        return []
    # pixel count per component: the same integers ndimage.sum_labels(mask, labelled, 1..count) gives,
    # in one pass (sum_labels cost ~2 ms per finding on noisy maps with many small components)
    areas = np.bincount(labelled.ravel(), minlength=count + 1)[1:]
    boxes = ndimage.find_objects(labelled)
    order = np.argsort(-areas, kind="stable")[:max_regions]
    out = []
    for idx in order:
        rows, cols = boxes[idx]
        out.append(transform.box_to_original((cols.start + c0, rows.start + r0, cols.stop + c0, rows.stop + r0)))
    return out


def _jet_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256, dtype=np.float32)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return np.stack([r, g, b], axis=1) * 255.0


_JET = _jet_lut()


def heatmap_png(
    pixels01: np.ndarray, cam: np.ndarray, transform: Transform, *, max_side: int = HEATMAP_MAX_SIDE
) -> bytes:
    """Colour map of `cam` over the grayscale original, as PNG bytes.

    The image is downscaled to at most `max_side` on its long side. The map covers only the
    center-crop square the model saw, so it is placed exactly there; outside it the film stays gray.
    """
    height, width = pixels01.shape
    ratio = min(1.0, max_side / max(height, width))
    out_w, out_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    base = Image.fromarray(np.ascontiguousarray(pixels01, dtype=np.float32), mode="F")
    if (out_w, out_h) != (width, height):  # resize first, then convert: the small image is cheap
        base = base.resize((out_w, out_h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    gray = np.clip(np.asarray(base, dtype=np.float32), 0.0, 1.0) * 255.0
    rgb = np.repeat(gray[:, :, None], 3, axis=2)

    x0 = min(round(transform.x0 * ratio), out_w - 1)
    y0 = min(round(transform.y0 * ratio), out_h - 1)
    side = max(1, min(round(transform.crop * ratio), out_w - x0, out_h - y0))
    cam_img = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32), mode="F")
    cam_sq = np.clip(np.asarray(cam_img.resize((side, side), Image.Resampling.BILINEAR)), 0.0, 1.0)
    colours = _JET[(cam_sq * 255.0).astype(np.uint8)]
    alpha = (0.15 + 0.45 * cam_sq)[:, :, None]  # weak evidence stays mostly gray
    patch = rgb[y0 : y0 + side, x0 : x0 + side]
    rgb[y0 : y0 + side, x0 : x0 + side] = patch * (1.0 - alpha) + colours * alpha

    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
