"""Fit the OOD gate and the population head on cached features (ml/training/gate_features.py).

Splits are by patient and fixed before anything is fitted:
  - kermany_pneumonia / kermany_fullres: the classifier's own split (ml.training.data, seed 0):
    "train" patients fit the heads; "cal" and "report" patients are held out (and the pediatric
    operating point is chosen on "cal", reported on "report");
  - nih_cxr14 / nih_cxr14_fullres: split "train" fits, "val" patients are held out;
  - covid19_hannover: half of the patients (seeded) fit, the other half is held out;
  - dicom/: never fitted (3 human chest films, the cat).
Generated negatives: their own fit / held-out sources (ood_negatives.py); inverted and turned
films follow their patient's side.

Thresholds come from the fit side only (out-of-fold scores, grouped by patient); every rate in the
report is measured on held-out patients / sources.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import numpy as np

from ml.population import PopulationParams
from ml.ood import GateParams

HEAD_PASS_QUANTILE = 0.001  # out-of-fold: the head lets 99.9% of fit chest films through
DIST_PASS_QUANTILE = 0.0005
PCA_COMPONENTS = 32
POSITIVE_VARIANTS = {"orig", "frame"}
NEGATIVE_FILM_VARIANTS = {"inv", "inv_frame", "rot90", "rot180", "rot270"}
ADULT_AGE = 18.0
INVERTED_DICOM = "fake_monochrome1"
ORIENT_C = 1.0


def wilson(k: int, n: int) -> tuple[float, float]:
    from ml.training.metrics import wilson_ci

    return wilson_ci(k, n) if n else (float("nan"), float("nan"))


def hannover_fit_patients(patients: Iterable[str]) -> set[str]:
    """The (seeded) half of the Hannover patients the heads are fitted on; the rest is held out."""
    han = sorted(set(patients))
    perm = np.random.default_rng(11).permutation(len(han))
    return {han[j] for j in perm[: len(han) // 2]}


def assign_sides(meta: list[dict[str, Any]], data_dir: Path) -> np.ndarray:
    """'fit' / 'held' per row; also 'kcal' / 'krep' for held Kermany rows (for the operating point)."""
    from ml.training.data import list_records

    kroles = {r.patient: r.role for r in list_records(data_dir) if r.dataset == "kermany_pneumonia"}
    han_fit = hannover_fit_patients(m["patient"] for m in meta if m["source"] == "covid19_hannover")
    nih_val = set()
    import csv

    for folder in ("nih_cxr14", "nih_cxr14_fullres"):
        p = data_dir / folder / "labels.csv"
        if p.exists():
            nih_val |= {r["patient_id"] for r in csv.DictReader(open(p)) if r["split"] == "val"}
    sides = []
    for m in meta:
        s = m["source"]
        if s.startswith("kermany"):
            role = kroles.get(m["patient"], "train")
            side = "fit" if role == "train" else ("kcal" if role == "cal" else "krep")
        elif s.startswith("nih"):
            side = "held" if m["patient"] in nih_val else "fit"
        elif s == "covid19_hannover":
            side = "fit" if m["patient"] in han_fit else "held"
        elif s == "dicom":
            side = "held"
        else:  # generated negatives
            side = "held" if m["holdout"] else "fit"
        sides.append(side)
    return np.array(sides)


def _lr(x: np.ndarray, y: np.ndarray, c: float, w: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=4000)
    clf.fit((x - mu) / sd, y, sample_weight=w)
    coef = clf.coef_[0] / sd
    return coef, float(clf.intercept_[0] - np.sum(clf.coef_[0] * mu / sd))


def _oof_logits(x: np.ndarray, y: np.ndarray, groups: np.ndarray, c: float, folds: int = 4) -> np.ndarray:
    uniq = np.unique(groups)
    order = np.random.default_rng(5).permutation(len(uniq))
    fold_of = {uniq[j]: i % folds for i, j in enumerate(order)}
    f = np.array([fold_of[g] for g in groups])
    out = np.zeros(len(y))
    for k in range(folds):
        w, b = _lr(x[f != k], y[f != k], c)
        out[f == k] = x[f == k] @ w + b
    return out


def fit(feats: np.ndarray, meta: list[dict[str, Any]], data_dir: Path, log) -> tuple[GateParams, PopulationParams, dict[str, Any]]:
    side = assign_sides(meta, data_dir)
    src = np.array([m["source"] for m in meta])
    var = np.array([m["variant"] for m in meta])
    pat = np.array([f"{m['source']}:{m['patient']}" for m in meta])
    is_film = np.isin(src, ["kermany_pneumonia", "kermany_fullres", "nih_cxr14", "nih_cxr14_fullres", "covid19_hannover", "dicom"])
    is_cat = np.array(["feline" in m["file"] for m in meta])
    # the SIIM film re-tagged MONOCHROME1: decoded correctly it is that film's photographic negative
    is_inverted_file = np.array([INVERTED_DICOM in m["file"] for m in meta])
    pos = is_film & ~is_cat & ~is_inverted_file & np.isin(var, list(POSITIVE_VARIANTS))
    # its own inverted variants are the upright film again: neither side
    neg = ((~is_film & np.char.startswith(var.astype(str), "neg:"))
           | (is_film & ~is_inverted_file & np.isin(var, list(NEGATIVE_FILM_VARIANTS)))
           | is_cat | (is_inverted_file & np.isin(var, list(POSITIVE_VARIANTS))))
    fit_m = side == "fit"

    # ---- chest-vs-not head
    xf = feats[fit_m & (pos | neg)]
    yf = pos[fit_m & (pos | neg)].astype(float)
    gf = pat[fit_m & (pos | neg)]
    c = 0.05
    t0 = time.time()
    oof = _oof_logits(xf, yf, gf, c)
    w, b = _lr(xf, yf, c)
    head_shift = float(np.quantile(oof[yf == 1], HEAD_PASS_QUANTILE))
    neg_max = float(oof[yf == 0].max())
    log(f"head: fit {len(yf)} rows ({int(yf.sum())} chest) in {time.time() - t0:.0f}s; OOF chest q{HEAD_PASS_QUANTILE}: "
        f"{head_shift:.2f}, OOF negatives max {neg_max:.2f}, 99.9%: {np.quantile(oof[yf == 0], 0.999):.2f}")
    # threshold: the pass quantile, but never above the midpoint between it and the negatives' top
    # (a wide gap is split so both sides keep a margin)
    if neg_max < head_shift:
        head_shift = 0.5 * (head_shift + neg_max)
    b -= head_shift

    # ---- orientation: upright films vs the same films turned 90/180/270 degrees or inverted (a linear
    # head of its own: mixed into the chest-vs-not head these hard negatives get too little weight)
    hard = is_film & ~is_cat & ~is_inverted_file & np.isin(var, list(NEGATIVE_FILM_VARIANTS))
    om = fit_m & (pos | hard)
    t0 = time.time()
    oof_o = _oof_logits(feats[om], pos[om].astype(float), pat[om], ORIENT_C)
    ow, ob = _lr(feats[om], pos[om].astype(float), ORIENT_C)
    ob -= float(np.quantile(oof_o[pos[om]], HEAD_PASS_QUANTILE))
    log(f"orientation: fit {int(om.sum())} rows in {time.time() - t0:.0f}s")

    # ---- typicality (PCA-whitened distance from fit chest films)
    fp = feats[fit_m & pos]
    mean = fp.mean(0)
    _, s, vt = np.linalg.svd(fp - mean, full_matrices=False)
    k = min(PCA_COMPONENTS, len(s))
    var_k = (s[:k] ** 2) / max(1, len(fp) - 1)
    params = GateParams(head_w=w, head_b=b, mean=mean, components=vt[:k], inv_sd=1.0 / np.sqrt(var_k + 1e-8),
                        dist_threshold=1.0, dist_scale=0.1, orient_w=ow, orient_b=ob)
    d_fit = params.distance(fp)
    params.dist_threshold = float(np.quantile(d_fit, 1.0 - DIST_PASS_QUANTILE))
    params.dist_scale = max(1e-3, 0.1 * params.dist_threshold)

    # ---- population head: young children (Kermany) vs adults (NIH >= 18 y, Hannover)
    ped = np.isin(src, ["kermany_pneumonia", "kermany_fullres"])
    ages = np.array([m["age"] for m in meta], dtype=float)
    adult = (np.isin(src, ["nih_cxr14", "nih_cxr14_fullres"]) & (ages >= ADULT_AGE)) | (src == "covid19_hannover")
    pm = fit_m & pos & (ped | adult)
    # Kermany outnumbers the adults ~6:1; class_weight="balanced" evens the classes
    pw, pb = _lr(feats[pm], ped[pm].astype(float), 0.05)
    population = PopulationParams(w=pw, b=pb)

    report = evaluate(params, population, feats, meta, side, pos, neg, ped, adult, log)
    report["fit"] = {"chest_rows": int((fit_m & pos).sum()), "negative_rows": int((fit_m & neg).sum()),
                     "population_rows": int(pm.sum()), "C": c, "pca_components": k,
                     "head_pass_quantile_oof": HEAD_PASS_QUANTILE, "distance_pass_quantile": DIST_PASS_QUANTILE}
    return params, population, report


def evaluate(params: GateParams, population: PopulationParams, feats: np.ndarray, meta: list[dict[str, Any]],
             side: np.ndarray, pos: np.ndarray, neg: np.ndarray, ped: np.ndarray, adult: np.ndarray, log) -> dict[str, Any]:
    from ml.ood import GATE_THRESHOLD

    head, dist = params.scores(feats)
    orient = params.orientation(feats)
    colour = np.array([m.get("colorfulness", 0.0) for m in meta]) > 0.06
    passed = (np.minimum(np.minimum(head, dist), orient) >= GATE_THRESHOLD) & ~colour
    src = np.array([m["source"] for m in meta])
    var = np.array([m["variant"] for m in meta])
    held = side != "fit"
    out: dict[str, Any] = {"chest_pass": {}, "negative_refusal": {}, "population": {}}
    for s in sorted(set(src[pos])):
        for vs, name in (({"orig"}, "as stored"), ({"frame"}, "framing variants")):
            m = held & pos & (src == s) & np.isin(var, list(vs))
            if not m.any():
                continue
            kk, n = int(passed[m].sum()), int(m.sum())
            lo, hi = wilson(kk, n)
            out["chest_pass"][f"{s} ({name})"] = {"n": n, "passed": kk, "rate": kk / n, "ci95": [lo, hi]}
            log(f"held-out {s} {name}: {kk}/{n} pass = {kk / n:.4f} (Wilson 95% {lo:.4f}-{hi:.4f}); "
                f"failing head {int(((head < 0.5) & m).sum())}, orientation {int(((orient < 0.5) & m).sum())}, "
                f"distance {int(((dist < 0.5) & m).sum())}")
    for s in sorted(set(src[pos])):
        m = (side == "fit") & pos & (src == s)
        if m.any():
            out["chest_pass"][f"{s} (fit patients, in-sample)"] = {"n": int(m.sum()), "passed": int(passed[m].sum()),
                                                                    "rate": float(passed[m].mean())}
    cats = np.array([v if v.startswith("neg:") else ("cat" if "feline" in m["file"] else
                     ("inverted_film" if v.startswith("inv") or INVERTED_DICOM in m["file"] else "rotated_film"))
                     for v, m in zip(var, meta)])
    for c in sorted(set(cats[neg])):
        for sname, sm in (("fit", ~held), ("held-out", held)):
            m = neg & (cats == c) & sm
            if m.any():
                kk, n = int((~passed[m]).sum()), int(m.sum())
                out["negative_refusal"][f"{c} ({sname})"] = {"n": n, "refused": kk, "rate": kk / n}
                log(f"{sname} negatives {c}: {kk}/{n} refused = {kk / n:.4f}")
    p_ped = population.probability(feats)
    for s in sorted(set(src[pos])):
        m = held & pos & (src == s) & (var == "orig") & (ped | adult)
        if not m.any():
            continue
        truth = ped[m]
        pred = p_ped[m] >= 0.5
        kk, n = int((pred == truth).sum()), int(m.sum())
        lo, hi = wilson(kk, n)
        out["population"][s] = {"n": n, "correct": kk, "accuracy": kk / n, "ci95": [lo, hi],
                                "truth": "pediatric" if truth.all() else ("adult" if (~truth).all() else "mixed")}
        log(f"population held-out {s}: {kk}/{n} = {kk / n:.4f} ({lo:.4f}-{hi:.4f})")
    kids = held & pos & np.isin(src, ["nih_cxr14"]) & (var == "orig") & ~adult
    if kids.any():
        out["population"]["nih_cxr14 under 18 (not fitted; ages 1-17)"] = {
            "n": int(kids.sum()), "called_pediatric": int((p_ped[kids] >= 0.5).sum())}
    return out


def export(params: GateParams, population: PopulationParams, report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    from ml.models.bundled import sha256_file
    from ml.ood import GATE_FILE, GATE_MANIFEST

    state = params.to_state() | population.to_state()
    path = out_dir / GATE_FILE
    save_file(state, str(path), metadata={"name": "cxr:gate-v2", "features": "cxr:pneumonia-v1 pooled backbone"})
    manifest = {
        "name": "cxr:gate-v2",
        "weights_file": GATE_FILE,
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "features": "cxr:pneumonia-v1 backbone, global-average-pooled last block (1280-d) at the model's input size",
        "population": {"validated": "pediatric", "validated_age_years": [0, 6],
                       "head": "logistic, P(pediatric film like Kermany's children aged 1-5)", "threshold": 0.5},
        "report": report,
    }
    (out_dir / GATE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from ml.training.gate_features import load_cache

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    feats, meta = load_cache(Path(args.cache))
    log(f"{len(meta)} cached rows")
    params, population, report = fit(feats, meta, Path(args.data), log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = export(params, population, report, out)
    log(f"wrote {out / manifest['weights_file']} sha256 {manifest['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
