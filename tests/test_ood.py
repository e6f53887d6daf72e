"""The bundled OOD gate: refuses what is not a frontal chest radiograph, passes real ones."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from ml.image import ImageMetadata, XRayImage
from ml.ood import GATE_THRESHOLD, load_default_gate, metadata_reason
from ml.training.ood_negatives import render_document, render_screenshot, skimage_photo, synthetic_pattern


@pytest.fixture(scope="module")
def gate():
    return load_default_gate()


def _image(pixels: np.ndarray, **meta) -> XRayImage:
    h, w = pixels.shape
    return XRayImage(pixels=pixels.astype(np.float32),
                     metadata=ImageMetadata(source_format=meta.pop("source_format", "png"), width=w, height=h, **meta))


def _load(data: bytes, name: str) -> XRayImage:
    from ml.ingest import load_image

    return load_image(data, max_bytes=1 << 30, max_pixels=1 << 28, filename=name)


def _assert_refused(gate, image: XRayImage):
    res = gate.check(image)
    assert not res.passed, res
    assert res.reason and res.score < res.threshold == GATE_THRESHOLD
    assert 0.0 <= res.score <= 1.0


# Seeds far from those used to fit the gate (fit uses seed*10000 + small offsets with seed 0).
@pytest.mark.parametrize("seed", [990_001, 990_002, 990_003, 990_008])
def test_refuses_noise_and_patterns(gate, seed):
    _, pixels = synthetic_pattern(seed)
    _assert_refused(gate, _image(pixels))


def test_refuses_uniform_noise(gate):
    _assert_refused(gate, _image(np.random.default_rng(7).random((512, 512), dtype=np.float32)))


def test_refuses_rendered_text_page_and_screenshot(gate):
    _assert_refused(gate, _image(render_document(987_654)))
    _assert_refused(gate, _image(render_screenshot(987_655)))


def test_refuses_colour_photo_through_ingest(gate):
    buf = io.BytesIO()
    Image.fromarray(__import__("skimage.data", fromlist=["x"]).astronaut()).save(buf, format="PNG")
    image = _load(buf.getvalue(), "astronaut.png")
    res = gate.check(image)
    assert not res.passed and "colour" in res.reason


def test_refuses_grey_photo_not_used_for_fitting(gate):
    # chelsea (a cat photo) and the coffee cup are held out of gate fitting
    _assert_refused(gate, _image(skimage_photo("chelsea")))
    _assert_refused(gate, _image(skimage_photo("coffee")))


def test_refuses_ct_by_modality_and_lateral_by_view():
    pixels = np.random.default_rng(1).random((64, 64), dtype=np.float32)
    assert "CT" in metadata_reason(_image(pixels, source_format="dicom", modality="CT"))
    assert "frontal" in metadata_reason(_image(pixels, source_format="dicom", modality="CR", view_position="LL"))
    assert "blank" in metadata_reason(_image(np.zeros((64, 64), np.float32)))


def test_refuses_chest_film_turned_sideways(gate, shared_data):
    rows = [r for r in csv.DictReader(open(shared_data / "nih_cxr14" / "labels.csv")) if r["split"] == "val"][:6]
    refused = 0
    for r in rows:
        image = _load((shared_data / "nih_cxr14" / r["file"]).read_bytes(), r["file"])
        refused += not gate.check(_image(np.rot90(image.pixels).copy())).passed
    assert refused >= 5


# Minimum passes out of 30, set from the measured pass rates with some margin (model card: NIH
# report split 97-100%, Hannover adult COVID films never trained on 92.6%, full-resolution Kermany
# films centre-cropped by the server 56/60).
@pytest.mark.parametrize("folder,limit,minimum", [("nih_cxr14", 30, 29), ("covid19_hannover", 30, 25),
                                                  ("kermany_fullres", 30, 25)])
def test_passes_real_chest_films(gate, shared_data, folder, limit, minimum):
    rows = list(csv.DictReader(open(shared_data / folder / "labels.csv")))
    if folder == "nih_cxr14":
        rows = [r for r in rows if r["split"] == "val"]
    passed = []
    for r in rows[:limit]:
        res = gate.check(_load((shared_data / folder / r["file"]).read_bytes(), r["file"]))
        assert 0.0 <= res.score <= 1.0
        passed.append(res.passed)
    assert sum(passed) >= minimum


def test_human_chest_dicoms_pass(gate, shared_data):
    for name in ("barre_CR-MONO1-10-chest_nometa.dcm", "nih_google_dx_secondary_capture_nofinding.dcm",
                 "siim_cr_pa_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"):
        res = gate.check(_load((shared_data / "dicom" / name).read_bytes(), name))
        assert res.passed, (name, res)


def test_refuses_the_cat(gate, shared_data):
    """A real DX chest radiograph of a cat: held out of gate fitting, must not pass as human."""
    name = "feline_dx_chest_ap_deid_data.dcm"
    _assert_refused(gate, _load((shared_data / "dicom" / name).read_bytes(), name))
