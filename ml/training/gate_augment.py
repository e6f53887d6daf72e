"""Framing variations the server really sees, applied to a decoded film (float [0, 1], H x W).

The gate and the population head score pooled backbone features of the centre-cropped film, so
anything that changes the framing or the grey levels of a real chest film (a border, collimation,
letterboxing, a different aspect ratio, an 8-bit or low-bit re-quantisation, a small JPEG
re-encode, a marker or text burned in, another VOI window) must still read as a chest film.
Every transform keeps the film a real frontal chest film; none makes it a negative.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_TEXTS = ("L", "R", "PORTABLE", "AP SUPINE", "PA ERECT", "SITTING", "2019-03-14 08:12", "ID 4471823",
          "CHEST", "kVp 110 mAs 2.5", "UPRIGHT", "SEMI-ERECT", "WARD 7B")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def aspect(px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stretch one axis (a squashed source film back to a plausible original aspect, or the reverse)."""
    h, w = px.shape
    f = rng.uniform(0.8, 1.35)
    nw, nh = (max(16, int(w * f)), h) if rng.random() < 0.7 else (w, max(16, int(h * f)))
    return np.asarray(Image.fromarray(px, mode="F").resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float32)


def border(px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = px.shape
    val = float(rng.choice([0.0, 1.0, rng.uniform(0, 1)]))
    t, b, l, r = (int(s * rng.uniform(0.0, 0.1)) for s in (h, h, w, w))
    return np.pad(px, ((t, b), (l, r)), constant_values=val).astype(np.float32)


def collimation(px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shutters: the exposed field is a rectangle, the rest is flat (bright or dark) grey."""
    h, w = px.shape
    out = px.copy()
    val = float(rng.choice([rng.uniform(0.85, 1.0), rng.uniform(0.0, 0.15)]))
    y0, y1 = int(h * rng.uniform(0, 0.08)), h - int(h * rng.uniform(0, 0.08))
    x0, x1 = int(w * rng.uniform(0, 0.12)), w - int(w * rng.uniform(0, 0.12))
    mask = np.ones_like(out, dtype=bool)
    mask[y0:y1, x0:x1] = False
    out[mask] = val
    return out


def letterbox(px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pad to a screen aspect (4:3 / 16:9, landscape or portrait) with black or white bars."""
    h, w = px.shape
    ratio = float(rng.choice([4 / 3, 16 / 9, 3 / 4]))
    val = 0.0 if rng.random() < 0.8 else 1.0
    if w / h < ratio:
        nw = int(round(h * ratio))
        pad = nw - w
        return np.pad(px, ((0, 0), (pad // 2, pad - pad // 2)), constant_values=val).astype(np.float32)
    nh = int(round(w / ratio))
    pad = max(0, nh - h)
    return np.pad(px, ((pad // 2, pad - pad // 2), (0, 0)), constant_values=val).astype(np.float32)


def requantise(px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """8-bit (or coarser, 6-7 bit) storage; a 16-bit film maps to [0, 1] with no visible change."""
    levels = float(2 ** int(rng.choice([6, 7, 8])) - 1)
    return (np.round(px * levels) / levels).astype(np.float32)


def jpeg_small(px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small, strongly compressed re-encode (a film forwarded by e-mail or a messaging app)."""
    h, w = px.shape
    side = int(rng.integers(200, 520))
    s = min(1.0, side / max(h, w))
    img = Image.fromarray(np.clip(px * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if s < 1.0:
        img = img.resize((max(8, int(w * s)), max(8, int(h * s))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(25, 80)))
    with Image.open(io.BytesIO(buf.getvalue())) as back:
        return np.asarray(back.convert("L"), dtype=np.float32) / 255.0


def burned_text(px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = px.shape
    img = Image.fromarray(np.clip(px * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        size = max(8, int(min(h, w) * rng.uniform(0.025, 0.07)))
        x = int(rng.choice([rng.uniform(0.02, 0.2), rng.uniform(0.6, 0.85)]) * w)
        y = int(rng.choice([rng.uniform(0.02, 0.12), rng.uniform(0.85, 0.94)]) * h)
        d.text((x, y), str(rng.choice(_TEXTS)), fill=int(rng.choice([255, 230, 0])), font=_font(size))
    return np.asarray(img, dtype=np.float32) / 255.0


def window(px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another VOI window / gamma (a different display LUT or window width)."""
    lo, hi = rng.uniform(0.0, 0.12), rng.uniform(0.85, 1.0)
    out = np.clip((px - lo) / (hi - lo), 0, 1)
    return (out ** rng.uniform(0.65, 1.5)).astype(np.float32)


def small_rotation_zoom(px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A film placed a few degrees off or cropped a little tighter."""
    h, w = px.shape
    img = Image.fromarray(px, mode="F").rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR,
                                               fillcolor=float(rng.choice([0.0, 1.0])))
    out = np.asarray(img, dtype=np.float32)
    s = rng.uniform(0.82, 1.0)
    ch, cw = int(h * s), int(w * s)
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return np.ascontiguousarray(out[y0:y0 + ch, x0:x0 + cw])


TRANSFORMS = (aspect, border, collimation, letterbox, requantise, jpeg_small, burned_text, window, small_rotation_zoom)


def frame_variant(px: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random combination (2-4) of the framing transforms, in a fixed sensible order."""
    px = np.ascontiguousarray(px, dtype=np.float32)
    k = int(rng.integers(2, 5))
    chosen = set(rng.choice(len(TRANSFORMS), size=k, replace=False).tolist())
    for i, t in enumerate(TRANSFORMS):
        if i in chosen:
            px = t(px, rng)
    return np.clip(px, 0.0, 1.0).astype(np.float32)
