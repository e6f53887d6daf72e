"""Offline non-chest images for fitting and testing the OOD gate, each with a category and a split.

Everything is generated or read from installed packages (scikit-image sample data, pydicom's test
files), so the gate is reproducible without downloads. "holdout" items are never used for fitting:
they are the ones whose refusal rate the model card reports. Held out by *source* (whole sample
images, whole DICOM files, separate random seeds), never by augmented copies of a fitted image.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@dataclass
class Negative:
    category: str
    source: str
    holdout: bool
    pixels: np.ndarray  # float32 (H, W) in [0, 1]


# scikit-image samples bundled with the wheel (no pooch download).
PHOTOS_FIT = ("astronaut", "rocket", "immunohistochemistry", "retina", "colorwheel", "camera", "coins",
              "cell", "microaneurysms", "brick", "grass", "horse", "logo")
PHOTOS_HOLDOUT = ("chelsea", "coffee", "clock", "gravel", "moon", "hubble_deep_field")
DOCS_HOLDOUT_SKIMAGE = ("text", "page")
DICOM_FIT = ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "JPEG2000.dcm", "examples_palette.dcm",
             "liver_1frame.dcm")
DICOM_HOLDOUT = ("MR_small.dcm", "693_J2KI.dcm", "examples_overlay.dcm", "JPGExtended.dcm",
                 "examples_rgb_color.dcm")


def _grey01(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.float32)
    if a.ndim == 3:
        a = a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    a = a.astype(np.float32)
    lo, hi = np.percentile(a, 0.5), np.percentile(a, 99.5)
    if hi - lo < 1e-6:
        lo, hi = float(a.min()), float(a.max()) + 1e-6
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _variants(img: np.ndarray, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """The image itself plus random crops / flips / inversions (variety, same source)."""
    out = [img]
    h, w = img.shape
    for _ in range(n - 1):
        s = rng.uniform(0.45, 1.0)
        ch, cw = max(8, int(h * s)), max(8, int(w * s))
        y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        v = img[y0 : y0 + ch, x0 : x0 + cw]
        if rng.random() < 0.5:
            v = v[:, ::-1]
        if rng.random() < 0.25:
            v = 1.0 - v
        if rng.random() < 0.3:
            v = np.clip(v ** rng.uniform(0.6, 1.6), 0, 1)
        out.append(np.ascontiguousarray(v, dtype=np.float32))
    return out


def skimage_photo(name: str) -> np.ndarray:
    import skimage.data as skd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _grey01(getattr(skd, name)())


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


_WORDS = ("patient report radiology result normal pending chest clinic summary invoice total date "
          "name address phone table value unit reference range login settings file edit view help "
          "window status ok cancel submit search home account profile").split()


def render_document(seed: int) -> np.ndarray:
    """A page of text lines, headings and a table, like a scanned or exported document."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(500, 900)), int(rng.integers(600, 1100))
    img = Image.new("L", (w, h), int(rng.integers(225, 256)))
    d = ImageDraw.Draw(img)
    y = int(rng.integers(20, 60))
    while y < h - 30:
        size = int(rng.choice([12, 14, 16, 20, 28]))
        if rng.random() < 0.15:  # table rows
            cols = int(rng.integers(2, 6))
            for c in range(cols + 1):
                x = 30 + c * (w - 60) // cols
                d.line([(x, y), (x, y + 3 * size)], fill=0, width=1)
            d.line([(30, y), (w - 30, y)], fill=0)
            d.line([(30, y + 3 * size), (w - 30, y + 3 * size)], fill=0)
        line = " ".join(rng.choice(_WORDS, int(rng.integers(3, 12))))
        d.text((int(rng.integers(20, 60)), y), line, fill=int(rng.integers(0, 60)), font=_font(size))
        y += int(size * rng.uniform(1.3, 2.2))
    return np.asarray(img, dtype=np.float32) / 255.0


def render_screenshot(seed: int) -> np.ndarray:
    """A desktop/app screenshot: title bars, panels, buttons, text; light or dark theme."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(640, 1280)), int(rng.integers(400, 800))
    dark = rng.random() < 0.4
    bg = int(rng.integers(20, 60)) if dark else int(rng.integers(200, 245))
    fg = 230 if dark else 20
    img = Image.new("L", (w, h), bg)
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w, 28], fill=int(rng.integers(60, 140)))
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, w - 120)), int(rng.integers(30, h - 80))
        x1, y1 = min(w - 1, x0 + int(rng.integers(100, 500))), min(h - 1, y0 + int(rng.integers(60, 300)))
        d.rectangle([x0, y0, x1, y1], fill=int(rng.integers(0, 256)), outline=fg)
        for k in range(int(rng.integers(1, 6))):
            ty = y0 + 8 + 18 * k
            if ty < y1 - 12:
                d.text((x0 + 8, ty), " ".join(rng.choice(_WORDS, 4)), fill=fg, font=_font(13))
    for _ in range(int(rng.integers(2, 8))):  # buttons
        bx, by = int(rng.integers(0, w - 90)), int(rng.integers(30, h - 30))
        d.rounded_rectangle([bx, by, bx + 80, by + 24], radius=5, fill=int(rng.integers(90, 200)))
        d.text((bx + 10, by + 5), str(rng.choice(_WORDS)), fill=fg, font=_font(12))
    return np.asarray(img, dtype=np.float32) / 255.0


def synthetic_pattern(seed: int) -> tuple[str, np.ndarray]:
    """Noise, gradients, checkerboards, stripes, blobs."""
    rng = np.random.default_rng(seed)
    s = int(rng.integers(128, 600))
    kind = ("uniform", "gaussian", "smooth", "gradient", "radial", "checker", "stripes", "saltpepper")[seed % 8]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    if kind == "uniform":
        a = rng.random((s, s))
    elif kind == "gaussian":
        a = np.clip(rng.normal(0.5, rng.uniform(0.05, 0.3), (s, s)), 0, 1)
    elif kind == "smooth":
        small = rng.random((int(rng.integers(4, 24)),) * 2).astype(np.float32)
        a = np.asarray(Image.fromarray(small, mode="F").resize((s, s), Image.Resampling.BICUBIC))
    elif kind == "gradient":
        ang = rng.uniform(0, 2 * np.pi)
        a = np.cos(ang) * xx + np.sin(ang) * yy
    elif kind == "radial":
        cx, cy = rng.random(2)
        a = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    elif kind == "checker":
        n = int(rng.integers(2, 24))
        a = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
    elif kind == "stripes":
        a = (np.sin(xx * rng.uniform(5, 80) + yy * rng.uniform(0, 30)) > 0).astype(np.float32)
    else:
        a = np.full((s, s), 0.5, np.float32)
        m = rng.random((s, s))
        a[m < 0.1] = 0.0
        a[m > 0.9] = 1.0
    a = np.asarray(a, dtype=np.float32)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
    return kind, a.astype(np.float32)


def read_dicom_pixels(path: Path) -> np.ndarray:
    """First frame of a DICOM file as grey [0, 1] (percentile window); colour -> luminance."""
    import pydicom

    ds = pydicom.dcmread(str(path), force=True)
    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if spp == 3 and arr.ndim == 3 and str(getattr(ds, "PhotometricInterpretation", "")).startswith("YBR"):
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, ds.PhotometricInterpretation, "RGB")
    if str(getattr(ds, "PhotometricInterpretation", "")) == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    grey = _grey01(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 1.0 - grey
    return grey


def pydicom_test_file(name: str) -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files" / name


def build_negatives(*, small: bool = False, seed: int = 0) -> list[Negative]:
    """The generated non-chest set (rotated chest films are added by the caller from its cache)."""
    rng = np.random.default_rng(seed)
    per_photo = 3 if small else 16
    n_docs, n_shots, n_noise = (4, 4, 8) if small else (60, 60, 96)
    out: list[Negative] = []
    photos = [(n, False) for n in PHOTOS_FIT] + [(n, True) for n in PHOTOS_HOLDOUT]
    docs = [(n, True) for n in DOCS_HOLDOUT_SKIMAGE]
    if small:
        photos, docs = photos[:3] + photos[-2:], docs[:1]
    for name, hold in photos:
        try:
            base = skimage_photo(name)
        except Exception:  # a sample missing from this scikit-image build
            continue
        for v in _variants(base, rng, per_photo):
            out.append(Negative("photo", f"skimage:{name}", hold, v))
    for name, hold in docs:
        base = skimage_photo(name)
        for v in _variants(base, rng, per_photo):
            out.append(Negative("document", f"skimage:{name}", hold, v))
    for i in range(n_docs):
        hold = i % 3 == 2
        out.append(Negative("document", f"rendered:{seed}:{i}", hold, render_document(seed * 10_000 + i)))
    for i in range(n_shots):
        hold = i % 3 == 2
        out.append(Negative("screenshot", f"rendered:{seed}:{i}", hold, render_screenshot(seed * 10_000 + 5000 + i)))
    for i in range(n_noise):
        hold = (i // 8) % 3 == 2  # every kind appears in both parts
        kind, a = synthetic_pattern(seed * 10_000 + 7000 + i)
        out.append(Negative("noise_pattern", f"synthetic:{kind}", hold, a))
    dicoms = [(n, False) for n in DICOM_FIT] + [(n, True) for n in DICOM_HOLDOUT]
    if small:
        dicoms = dicoms[:1] + dicoms[-1:]
    for name, hold in dicoms:
        try:
            base = read_dicom_pixels(pydicom_test_file(name))
        except Exception:
            continue
        for v in _variants(base, rng, per_photo):
            out.append(Negative("ct_mr_other_modality", f"pydicom:{name}", hold, v))
    if not small:
        base = skimage_photo("shepp_logan_phantom")
        for v in _variants(base, rng, per_photo):
            out.append(Negative("ct_mr_other_modality", "skimage:shepp_logan_phantom", False, v))
    return out
