"""The statistics behind `cxr evaluate` and the model card, on inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.training.metrics import (
    auroc,
    binary_report,
    bootstrap_auroc_ci,
    ece,
    fit_temperature,
    threshold_for_sensitivity,
    wilson_ci,
)


def test_auroc_known_values():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auroc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    # one of four pos/neg pairs misordered
    assert auroc(y, np.array([0.1, 0.6, 0.5, 0.9])) == pytest.approx(0.75)
    assert math.isnan(auroc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_auroc_matches_sklearn_on_random_data():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) + 0.3 * y, 2)  # rounded: plenty of ties
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_wilson_ci_known_and_contains_point():
    lo, hi = wilson_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_ci(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    for k, n in [(1, 3), (97, 100), (5, 7)]:
        lo, hi = wilson_ci(k, n)
        assert lo <= k / n <= hi
    assert all(math.isnan(v) for v in wilson_ci(0, 0))


def test_bootstrap_ci_brackets_auroc():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    p = rng.random(200) + 0.5 * y
    lo, hi = bootstrap_auroc_ci(y, p, n_boot=300)
    assert lo < auroc(y, p) < hi and hi - lo < 0.3


def test_ece_perfect_and_overconfident():
    rng = np.random.default_rng(3)
    p = rng.random(20000)
    y = rng.random(20000) < p  # calibrated by construction
    assert ece(y, p) < 0.02
    assert ece(np.array([0, 0, 0, 0]), np.array([0.95, 0.95, 0.95, 0.95])) == pytest.approx(0.95)


def test_fit_temperature_recovers_scale():
    rng = np.random.default_rng(4)
    true_logit = rng.normal(0, 2, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-true_logit))
    # a model 3x overconfident: its logits are 3x the true ones
    assert fit_temperature(3.0 * true_logit, y) == pytest.approx(3.0, rel=0.1)


def test_threshold_for_sensitivity_meets_target():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 500)
    p = rng.random(500) * 0.5 + 0.4 * y
    thr = threshold_for_sensitivity(y, p, 0.95)
    sens = ((p >= thr) & (y == 1)).sum() / (y == 1).sum()
    assert sens >= 0.95
    # and it is the highest such threshold: the next positive score up would drop below target
    higher = np.sort(p[y == 1])
    above = higher[higher > thr]
    if len(above):
        assert ((p >= above[0]) & (y == 1)).sum() / (y == 1).sum() < 0.95


def test_binary_report_confusion():
    y = np.array([1, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    r = binary_report(y, p, 0.5, n_boot=50)
    assert r["confusion"] == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert r["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert r["specificity"]["value"] == pytest.approx(2 / 3)
    assert r["accuracy"]["k"] == 4 and r["n"] == 6
    lo, hi = r["ppv"]["ci95"]
    assert lo <= r["ppv"]["value"] <= hi
