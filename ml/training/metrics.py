"""Evaluation statistics used by training (selection, calibration) and `cxr evaluate`.

Plain numpy (+ scipy ranks), no sklearn, so the numbers the model card quotes come from code the tests exercise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN without both classes."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata  # average ranks over ties

    ranks = rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_auroc_ci(y: np.ndarray, p: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                       alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI for AUROC (resampling images; stratified so both classes stay)."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        stats[b] = auroc(y[idx], p[idx])
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


def wilson_ci(successes: int, n: int, *, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion; (nan, nan) when n == 0."""
    if n == 0:
        return float("nan"), float("nan")
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def ece(y: np.ndarray, p: np.ndarray, *, n_bins: int = 15) -> float:
    """Expected calibration error of P(y=1) with equal-width bins (binary reliability)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() * abs(y[m].mean() - p[m].mean())
    return float(total / len(y))


def _proportion(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_ci(k, n)
    return {"value": (k / n) if n else float("nan"), "ci95": [lo, hi], "k": k, "n": n}


def binary_report(y: np.ndarray, p: np.ndarray, threshold: float, *, n_boot: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """n, AUROC (bootstrap CI), accuracy/sensitivity/specificity/PPV/NPV (Wilson CIs), ECE."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    pred = p >= threshold
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    lo, hi = bootstrap_auroc_ci(y, p, n_boot=n_boot, seed=seed)
    return {
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "threshold": float(threshold),
        "auroc": {"value": auroc(y, p), "ci95": [lo, hi]},
        "accuracy": _proportion(tp + tn, len(y)),
        "sensitivity": _proportion(tp, tp + fn),
        "specificity": _proportion(tn, tn + fp),
        "ppv": _proportion(tp, tp + fp),
        "npv": _proportion(tn, tn + fn),
        "ece": ece(y, p),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising the NLL of sigmoid(logit / T) (1-D search on log T; convex enough)."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)

    def nll(log_temp: float) -> float:
        s = z / math.exp(log_temp)
        return float(np.mean(np.logaddexp(0.0, s) - t * s))

    lo, hi = math.log(0.05), math.log(20.0)
    for _ in range(100):  # golden-section search
        a = hi - (hi - lo) * 0.618
        b = lo + (hi - lo) * 0.618
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float(math.exp((lo + hi) / 2))


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float = 0.95) -> float:
    """The highest threshold whose sensitivity (p >= threshold) is still >= target."""
    y = np.asarray(y).astype(bool)
    pos = np.sort(np.asarray(p, dtype=np.float64)[y])
    if len(pos) == 0:
        return 0.5
    # allowed misses: the k lowest positives may fall below the threshold
    k = int(math.floor((1.0 - target) * len(pos) + 1e-9))
    return float(pos[k])
