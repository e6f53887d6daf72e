"""The shipped cxr:pneumonia-v1 bundle: verified loading, shape/range, sensitivity to input."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

from ml.errors import ModelUnavailable
from ml.models.bundled import MANIFEST_FILE, WEIGHTS_DIR, WEIGHTS_FILE, load_bundled, sha256_file
from ml.preprocess import to_model_input
from ml.training.data import read_pixels01


@pytest.fixture(scope="module")
def model():
    return load_bundled()


def test_manifest_describes_the_weights():
    manifest = json.loads((WEIGHTS_DIR / MANIFEST_FILE).read_text())
    assert manifest["sha256"] == sha256_file(WEIGHTS_DIR / WEIGHTS_FILE)
    assert manifest["labels"] == ["pneumonia"] and manifest["displays"] == ["Pneumonia"]
    assert 0.0 < manifest["thresholds"][0] < 1.0 and manifest["temperature"] > 0
    assert (WEIGHTS_DIR / WEIGHTS_FILE).stat().st_size <= 25 * 1024 * 1024
    for key in ("architecture", "input_size", "training", "metrics", "calibration", "ood"):
        assert key in manifest


def test_load_is_fast_and_describes_itself(model):
    t0 = time.perf_counter()
    again = load_bundled()
    assert time.perf_counter() - t0 < 3.0  # well under 1 s unloaded; slack for a busy CI box
    assert again.info.name == "cxr:pneumonia-v1"
    assert again.info.version == json.loads((WEIGHTS_DIR / MANIFEST_FILE).read_text())["sha256"][:12]
    assert again.info.model_card_url == "docs/model_card.md" and not again.info.untrained
    assert model.labels == ("pneumonia",) and model.displays == ("Pneumonia",)
    assert any(m is model.cam_layer for m in model.network.modules())
    assert model.ood_gate is not None


def _copy_bundle(tmp_path):
    for name in (WEIGHTS_FILE, MANIFEST_FILE):
        shutil.copy(WEIGHTS_DIR / name, tmp_path / name)
    return tmp_path


def test_tampered_weights_are_refused(tmp_path):
    wdir = _copy_bundle(tmp_path)
    load_bundled(weights_dir=wdir)  # the untouched copy loads
    data = bytearray((wdir / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF  # one flipped byte deep in the tensor data
    (wdir / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelUnavailable, match=WEIGHTS_FILE):
        load_bundled(weights_dir=wdir)


def test_missing_weights_or_manifest_are_refused(tmp_path):
    wdir = _copy_bundle(tmp_path)
    (wdir / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelUnavailable, match=WEIGHTS_FILE):
        load_bundled(weights_dir=wdir)
    (wdir / MANIFEST_FILE).unlink()
    with pytest.raises(ModelUnavailable, match=MANIFEST_FILE):
        load_bundled(weights_dir=wdir)
    with pytest.raises(ModelUnavailable):
        load_bundled("cxr:no-such-model")


def test_output_shape_range_and_input_dependence(model):
    s = model.input_size
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1024, 1024, (3, 1, s, s)).astype(np.float32))
    x[1] = -1024.0
    with torch.no_grad():
        p = model.network(x)
    assert p.shape == (3, 1) and p.dtype == torch.float32
    assert bool(((p >= 0) & (p <= 1)).all())
    assert float(p.max() - p.min()) > 1e-3  # not a constant


def test_pediatric_films_are_separated(model, shared_data):
    """Real Kermany full-resolution films: pneumonia cases score higher than normal ones on average."""
    import csv

    rows = list(csv.DictReader(open(shared_data / "kermany_fullres" / "labels.csv")))
    probs = {"PNEUMONIA": [], "NORMAL": []}
    for r in rows[:40]:
        x, _ = to_model_input(read_pixels01(shared_data / "kermany_fullres" / r["file"]), model.input_size)
        with torch.no_grad():
            probs[r["labels"]].append(float(model.network(torch.from_numpy(x)[None])[0, 0]))
    assert probs["PNEUMONIA"] and probs["NORMAL"]
    assert np.mean(probs["PNEUMONIA"]) > np.mean(probs["NORMAL"]) + 0.2
