"""Grad-CAM maps, regions in original pixels and heatmap overlays (ml/explain.py)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from ml.explain import cam_regions, heatmap_png
from ml.preprocess import Transform
from model_fixtures import quadrant_pixels, tiny_analyzer, xray_image


def _close(box, expected, tol=3):
    return all(abs(a - b) <= tol for a, b in zip(box, expected, strict=True))


@pytest.mark.parametrize(("width", "height"), [(400, 250), (250, 400), (333, 333)])
def test_region_lands_in_the_quadrant_the_output_depends_on(width, height):
    # The tiny net's pneumonia output sees only the top-left quadrant of the (center-cropped)
    # input and effusion only the bottom-right one. A uniformly white film activates both.
    side = min(width, height)
    x0, y0, half = (width - side) // 2, (height - side) // 2, side / 2
    analysis = tiny_analyzer().analyze_image(xray_image(quadrant_pixels(width, height, quadrant="all")))
    by = {f.label: f for f in analysis.findings}
    assert by["pneumonia"].detected and by["effusion"].detected
    assert len(by["pneumonia"].regions) == 1 and len(by["effusion"].regions) == 1
    assert _close(by["pneumonia"].regions[0], [x0, y0, x0 + half, y0 + half])
    assert _close(by["effusion"].regions[0], [x0 + half, y0 + half, x0 + side, y0 + side])


def test_region_follows_the_image_content_not_a_fixed_place():
    # Only the top-left quadrant bright: pneumonia detected there, effusion not detected (no region).
    analysis = tiny_analyzer().analyze_image(xray_image(quadrant_pixels(600, 300, quadrant="top_left")))
    by = {f.label: f for f in analysis.findings}
    assert by["pneumonia"].detected and not by["effusion"].detected
    assert _close(by["pneumonia"].regions[0], [150, 0, 300, 150])
    assert by["effusion"].regions == []


def test_cam_regions_largest_first_and_at_most_three():
    cam = np.zeros((100, 100), dtype=np.float32)
    cam[0:10, 0:10] = 1.0  # area 100
    cam[50:80, 50:90] = 0.9  # area 1200
    cam[20:25, 60:65] = 0.8  # area 25
    cam[90:95, 0:20] = 0.7  # area 100
    cam[40:42, 0:2] = 0.2  # below half of max: not a region
    identity = Transform(x0=0, y0=0, crop=100, size=100)
    boxes = cam_regions(cam, identity)
    assert len(boxes) == 3
    assert boxes[0] == [50, 50, 90, 80]
    assert {tuple(b) for b in boxes[1:]} == {(0, 0, 10, 10), (0, 90, 20, 95)}
    # mapped through a crop offset and scale
    shifted = cam_regions(cam, Transform(x0=30, y0=0, crop=200, size=100))
    assert shifted[0] == [130, 100, 210, 160]
    assert cam_regions(np.zeros((10, 10), np.float32), identity) == []


def test_heatmap_png_overlays_only_the_crop_square_and_keeps_aspect():
    width, height = 1200, 600  # downscaled to 512x256; crop square is x in [300, 900) -> [128, 384)
    pixels = np.full((height, width), 0.5, dtype=np.float32)
    cam = np.ones((64, 64), dtype=np.float32)
    png = heatmap_png(pixels, cam, Transform(x0=300, y0=0, crop=600, size=64))
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert img.shape == (256, 512, 3)
    gray = (img[:, :, 0] == img[:, :, 1]) & (img[:, :, 1] == img[:, :, 2])
    assert gray[:, :120].all() and gray[:, 392:].all()  # outside the crop: untouched film
    assert not gray[:, 136:376].any()  # inside: coloured everywhere (cam = 1)


def test_heatmaps_only_when_requested_and_for_top_k_when_nothing_detected():
    analyzer = tiny_analyzer(heatmap_top_k=2)
    dark = xray_image(quadrant_pixels(300, 300, quadrant=None, base=0.3))
    plain = analyzer.analyze_image(dark)
    assert all(f.heatmap_png is None for f in plain.findings)
    assert not any(f.detected for f in plain.findings)
    with_maps = analyzer.analyze_image(dark, heatmaps=True)
    pngs = [f for f in with_maps.findings if f.heatmap_png]
    assert [f.label for f in pngs] == [f.label for f in with_maps.findings[:2]]
    for f in pngs:
        assert Image.open(io.BytesIO(f.heatmap_png)).format == "PNG"


def test_concurrent_calls_do_not_mix_activations():
    analyzer = tiny_analyzer()
    images = {
        "tl": xray_image(quadrant_pixels(400, 250, quadrant="top_left")),
        "br": xray_image(quadrant_pixels(400, 250, quadrant="bottom_right")),
    }
    expected = {k: analyzer.analyze_image(v) for k, v in images.items()}

    def run(key):
        return key, analyzer.analyze_image(images[key], heatmaps=True)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, ["tl", "br"] * 20))
    for key, analysis in results:
        got = {f.label: f.regions for f in analysis.findings}
        want = {f.label: f.regions for f in expected[key].findings}
        assert got == want


def _regions_reference(cam, transform, level=0.5, max_regions=3):
    """cam_regions as it was before the bincount speed-up (ndimage.sum_labels): the answers must not move."""
    from scipy import ndimage

    peak = float(cam.max())
    if peak <= 0.0:
        return []
    mask = cam >= level * peak
    labelled, count = ndimage.label(mask)
    if count == 0:
        return []
    areas = ndimage.sum_labels(mask, labelled, index=np.arange(1, count + 1))
    boxes = ndimage.find_objects(labelled)
    order = np.argsort(-areas, kind="stable")[:max_regions]
    return [transform.box_to_original((boxes[i][1].start, boxes[i][0].start, boxes[i][1].stop, boxes[i][0].stop))
            for i in order]


@pytest.mark.parametrize("seed", range(40))
def test_regions_are_unchanged_by_the_faster_area_count_and_crop(seed):
    rng = np.random.default_rng(seed)
    small = rng.random((7, 7)).astype(np.float32) ** (1 + seed % 4)  # smooth maps and many-component ones
    cam = np.asarray(Image.fromarray(small, mode="F").resize((224, 224), Image.Resampling.BILINEAR))
    if seed % 2:
        cam = cam + 0.3 * rng.random((224, 224)).astype(np.float32)  # noisy: many small components
    if seed % 5 == 0:  # equal-area components: the tie-break (raster order) must survive the crop
        cam = np.zeros((224, 224), np.float32)
        for y, x in rng.integers(20, 200, size=(4, 2)):
            cam[y : y + 5, x : x + 5] = 1.0
    transform = Transform(x0=10 * seed, y0=3, crop=900, size=224)
    assert cam_regions(cam, transform) == _regions_reference(cam, transform)
