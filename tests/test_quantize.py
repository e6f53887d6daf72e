"""int8 static quantization: calibrated on training films, kept only when held-out AUROC drops <= 0.005."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from ml import engine as eng
from ml import quantize as q
from ml.models.untrained import load_untrained


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, bundled_model, shared_data):
    cache = tmp_path_factory.mktemp("onnx-cache")
    report = q.quantize(bundled_model, cache_dir=cache, data_dir=shared_data, calibration=60, validation_limit=240)
    return cache, report


def test_auroc_matches_definition():
    y = np.array([0, 0, 1, 1])
    assert q.auroc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert q.auroc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)


def test_int8_report_and_serving_follow_the_validation(quantized, bundled_model, tmp_path):
    cache, report = quantized
    pneu = report["findings"]["pneumonia"]
    assert pneu["validated"] and pneu["n"] >= 2 * q.MIN_CLASS_COUNT
    assert pneu["drop"] == pytest.approx(pneu["auroc_fp32"] - pneu["auroc_int8"], abs=2e-5)
    assert report["accepted"] == (
        pneu["drop"] <= q.MAX_AUROC_DROP and pneu["decision_agreement"] >= q.MIN_DECISION_AGREEMENT
    )
    assert 0.0 <= pneu["mean_abs_prob_diff"] <= pneu["max_abs_prob_diff"]
    assert report["calibration_images"] == 60
    engine = eng.build_engine(bundled_model, "onnx", cache_dir=cache, precision="int8")
    assert isinstance(engine, eng.OnnxEngine)
    assert engine.precision == ("int8" if report["accepted"] else "fp32")
    if report["accepted"]:
        batch = eng.check_images(bundled_model.input_size, 4)
        p8, feats = engine.forward(batch)
        p32 = eng.torch_forward(bundled_model, batch)
        assert p8.shape == p32.shape and feats.shape[0] == 4
        assert np.all((p8 >= 0) & (p8 <= 1))


def test_rejected_int8_is_not_served(quantized, bundled_model, caplog):
    cache, report = quantized
    _, report_path = q.int8_paths(eng.cached_export(bundled_model, cache))
    rejected = {**report, "accepted": False, "reason": "AUROC drop > 0.005 for pneumonia"}
    original = report_path.read_text()
    report_path.write_text(json.dumps(rejected))
    try:
        with caplog.at_level(logging.WARNING, logger="ml.engine"):
            engine = eng.build_engine(bundled_model, "onnx", cache_dir=cache, precision="int8")
        assert engine.precision == "fp32"
        assert any("int8 rejected" in r.message for r in caplog.records)
    finally:
        report_path.write_text(original)


def test_int8_without_quantize_run_serves_fp32(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ml.engine"):
        engine = eng.build_engine(load_untrained(), "onnx", cache_dir=tmp_path, precision="int8")
    assert isinstance(engine, eng.OnnxEngine) and engine.precision == "fp32"
    assert any("cxr quantize" in r.message for r in caplog.records)


def test_calibration_never_uses_validation_films(shared_data):
    calib = set(q.calibration_files(shared_data, 10_000))
    held = {it.path for items in q.validation_sets(shared_data, ("pneumonia", "effusion"), limit=10_000).values()
            for it in items}
    assert calib and held and not (calib & held)
