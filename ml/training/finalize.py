"""After training: temperature scaling, operating threshold, report metrics, OOD gate, export.

Honesty rule: everything that is *chosen* (candidate, temperature, threshold, gate thresholds) is
chosen on the "cal" part of validation; every number we publish as a result is measured on the
patient-disjoint "report" part (or on held-out negative sources / data never trained on).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ml.models.bundled import MANIFEST_FILE, WEIGHTS_FILE, PneumoniaNet, sha256_file
from ml.ood import GATE_THRESHOLD, GateParams
from ml.preprocess import to_model_input
from ml.training.data import Record, from_uint8, read_pixels01
from ml.training.metrics import binary_report, ece, fit_temperature, threshold_for_sensitivity
from ml.training.ood_negatives import build_negatives
from ml.training.train import TrainConfig, _role_index, augment, predict_features, predict_logits

Log = Callable[[str], None]
SENSITIVITY_TARGET = 0.95
GATE_PASS_QUANTILE = 0.005  # each learned check lets ~99.5% of calibration chest films through
PCA_COMPONENTS = 32


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def _git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                                   timeout=5).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "uncommitted"


def _subset(records: list[Record], idx: np.ndarray, pred) -> np.ndarray:
    return np.array([i for i in idx if pred(records[i])], dtype=np.int64)


def calibrate_and_report(net: PneumoniaNet, images: np.ndarray, records: list[Record], log: Log) -> dict[str, Any]:
    labels = np.array([r.label for r in records], dtype=np.float64)
    cal = _role_index(records, "cal")
    rep = _role_index(records, "report")
    z_cal = predict_logits(net, images, cal)
    z_rep = predict_logits(net, images, rep)
    logit_of = dict(zip(cal.tolist(), z_cal)) | dict(zip(rep.tolist(), z_rep))
    temp = fit_temperature(z_cal, labels[cal])
    p_cal = _sigmoid(z_cal / temp)
    thr = threshold_for_sensitivity(labels[cal], p_cal, SENSITIVITY_TARGET)
    log(f"temperature {temp:.4f}; threshold {thr:.4f} (cal sensitivity >= {SENSITIVITY_TARGET})")

    def probs(idx: np.ndarray, t: float) -> np.ndarray:
        return _sigmoid(np.array([logit_of[i] for i in idx]) / t)

    calibration = {}
    for name, idx in (("cal", cal), ("report", rep)):
        calibration[name] = {"ece_before": ece(labels[idx], probs(idx, 1.0)), "ece_after": ece(labels[idx], probs(idx, temp)),
                             "n": int(len(idx))}
    groups = {
        "report_all": rep,
        "report_kermany_pediatric": _subset(records, rep, lambda r: r.dataset == "kermany_pneumonia"),
        "report_nih_adult": _subset(records, rep, lambda r: r.dataset == "nih_cxr14"),
        # adult pneumonia vs films with other findings only (no "No Finding" negatives)
        "report_nih_pneumonia_vs_other_findings": _subset(
            records, rep, lambda r: r.dataset == "nih_cxr14" and (r.label == 1 or r.other_finding == 1)),
        "cal_all_in_sample": cal,
    }
    metrics = {}
    for name, idx in groups.items():
        if len(idx):
            metrics[name] = binary_report(labels[idx], probs(idx, temp), thr)
            m = metrics[name]
            log(f"{name}: n={m['n']} auroc={m['auroc']['value']:.4f} {m['auroc']['ci95']} "
                f"acc={m['accuracy']['value']:.4f} sens={m['sensitivity']['value']:.4f} "
                f"spec={m['specificity']['value']:.4f} ece={m['ece']:.4f}")
    return {"temperature": temp, "threshold": thr, "calibration": calibration, "metrics": metrics}


def _features_of_pixels(net: PneumoniaNet, pixels: list[np.ndarray], size: int) -> np.ndarray:
    x = np.stack([to_model_input(p, size)[0] for p in pixels]).astype(np.float32) if pixels else np.zeros((0, 1, size, size), np.float32)
    return predict_features(net, x)


def _rot_features(net: PneumoniaNet, images: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Chest films turned by 90, 180 or 270 degrees (cycled): not a frontal view as presented."""
    rot = np.stack([np.rot90(images[i], k=1 + (j % 3)) for j, i in enumerate(idx)])
    return predict_features(net, from_uint8(np.ascontiguousarray(rot)))


def fit_gate(cfg: TrainConfig, net: PneumoniaNet, images: np.ndarray, records: list[Record], log: Log) -> tuple[GateParams, dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(cfg.seed + 7)
    small = cfg.extra.get("ood_negatives") == "small"
    train = _role_index(records, "train")
    pos_fit = np.sort(rng.choice(train, min(len(train), 300 if small else 2000), replace=False))
    t0 = time.time()
    # Half the chest films as stored, half with the training augmentation (framing, contrast): the
    # gate must accept films framed or exposed a little differently from the training JPEGs.
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    x_pos = from_uint8(images[pos_fit])
    half = len(pos_fit) // 2
    x01 = torch.from_numpy((x_pos[half:] + 1024.0) / 2048.0)
    x_pos[half:] = (augment(x01, gen) * 2048.0 - 1024.0).numpy()
    f_pos = predict_features(net, x_pos)
    # Adult films: half of the Hannover COVID-19 patients (never used to train the classifier) join
    # the gate's chest examples, so adult AP/ICU films are not mistaken for non-chest images; the
    # other half of the patients is only used to report the pass rate.
    extra = _role_index(records, "extra")
    extra_patients = sorted({records[i].patient for i in extra})
    perm = np.random.default_rng(cfg.seed + 3).permutation(len(extra_patients))
    fit_patients = {extra_patients[j] for j in perm[: len(extra_patients) // 2]}
    extra_fit = np.array([i for i in extra if records[i].patient in fit_patients], dtype=np.int64)
    extra_hold = np.array([i for i in extra if records[i].patient not in fit_patients], dtype=np.int64)
    if len(extra_fit):
        f_pos = np.concatenate([f_pos, predict_features(net, from_uint8(images[extra_fit]))])
    log(f"gate: {len(pos_fit)} chest features ({time.time() - t0:.0f}s)")

    negs = build_negatives(small=small, seed=cfg.seed)
    f_neg = _features_of_pixels(net, [n.pixels for n in negs], cfg.size)
    neg_cat = np.array([n.category for n in negs])
    neg_hold = np.array([n.holdout for n in negs])
    rot_fit = rng.choice(train, min(len(train), 60 if small else 500), replace=False)
    rep = _role_index(records, "report")
    rot_hold = rng.choice(rep, min(len(rep), 20 if small else 200), replace=False)
    f_rot_fit = _rot_features(net, images, rot_fit)
    f_rot_hold = _rot_features(net, images, rot_hold)
    log(f"gate: {len(negs)} generated negatives + rotated films ({time.time() - t0:.0f}s)")

    x_fit = np.concatenate([f_pos, f_neg[~neg_hold], f_rot_fit]).astype(np.float64)
    y_fit = np.concatenate([np.ones(len(f_pos)), np.zeros(int((~neg_hold).sum()) + len(f_rot_fit))])
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    clf = LogisticRegression(C=0.05, class_weight="balanced", max_iter=3000)
    clf.fit((x_fit - mu) / sd, y_fit)
    w = clf.coef_[0] / sd
    b = float(clf.intercept_[0] - np.sum(clf.coef_[0] * mu / sd))

    # Typicality: PCA-whitened distance from the training chest films.
    centred = f_pos.astype(np.float64) - f_pos.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(PCA_COMPONENTS, len(s))
    var = (s[:k] ** 2) / max(1, len(f_pos) - 1)
    params = GateParams(head_w=w, head_b=b, mean=f_pos.mean(0).astype(np.float64), components=vt[:k],
                        inv_sd=1.0 / np.sqrt(var + 1e-8), dist_threshold=1.0, dist_scale=0.1)

    # Thresholds from the calibration chest films only.
    cal = _role_index(records, "cal")
    f_cal = predict_features(net, from_uint8(images[cal]))
    params.head_b -= float(np.quantile(params.head_logit(f_cal), GATE_PASS_QUANTILE))
    d_cal = params.distance(f_cal)
    params.dist_threshold = float(np.quantile(d_cal, 1.0 - GATE_PASS_QUANTILE))
    params.dist_scale = max(1e-3, 0.1 * params.dist_threshold)

    def passed(f: np.ndarray) -> np.ndarray:
        h, d = params.scores(f)
        return np.minimum(h, d) >= GATE_THRESHOLD

    report: dict[str, Any] = {"threshold": GATE_THRESHOLD, "pass_quantile_each_check": 1 - GATE_PASS_QUANTILE,
                              "pca_components": k, "fit": {"chest": int(len(f_pos)), "chest_hannover_patients": int(len(extra_fit)),
                              "negatives": int((~neg_hold).sum()) + len(rot_fit)}}
    pass_rates = {}
    f_rep = predict_features(net, from_uint8(images[rep]))
    for name, f, idx in (("cal_chest_in_sample", f_cal, cal), ("report_chest", f_rep, rep)):
        ok = passed(f)
        pass_rates[name] = {"n": int(len(ok)), "pass_rate": float(ok.mean()) if len(ok) else float("nan")}
        for ds in sorted({records[i].dataset for i in idx}):
            m = np.array([records[i].dataset == ds for i in idx])
            pass_rates[f"{name}:{ds}"] = {"n": int(m.sum()), "pass_rate": float(ok[m].mean())}
    for name, idx in (("covid19_hannover_heldout_patients", extra_hold),
                      ("covid19_hannover_gate_fit_patients_in_sample", extra_fit)):
        if len(idx):
            ok = passed(predict_features(net, from_uint8(images[idx])))
            pass_rates[name] = {"n": int(len(ok)), "pass_rate": float(ok.mean())}
    report["chest_pass_rates"] = pass_rates

    refusals = {}
    for cat in sorted(set(neg_cat)):
        for hold in (False, True):
            m = (neg_cat == cat) & (neg_hold == hold)
            if m.any():
                refusals[f"{cat}:{'holdout' if hold else 'fit'}"] = {
                    "n": int(m.sum()), "refusal_rate": float(1.0 - passed(f_neg[m]).mean()),
                    "sources": sorted({negs[i].source.split(':')[0] + ':' + negs[i].source.split(':')[1]
                                       for i in np.flatnonzero(m)})[:12]}
    refusals["rotated_chest:fit"] = {"n": int(len(rot_fit)), "refusal_rate": float(1 - passed(f_rot_fit).mean())}
    refusals["rotated_chest:holdout"] = {"n": int(len(rot_hold)), "refusal_rate": float(1 - passed(f_rot_hold).mean())}
    hold_all = np.concatenate([f_neg[neg_hold], f_rot_hold])
    refusals["all_holdout"] = {"n": int(len(hold_all)), "refusal_rate": float(1 - passed(hold_all).mean())}
    report["negative_refusal_rates"] = refusals
    for key, val in list(pass_rates.items()) + list(refusals.items()):
        log(f"gate {key}: {json.dumps({k: v for k, v in val.items() if k != 'sources'})}")
    return params, report


def gate_on_files(net: PneumoniaNet, params: GateParams, data_dir: Path, size: int, log: Log) -> dict[str, Any]:
    """Gate decisions on real files through ml.ingest when it exists (DICOMs incl. the cat, full-res films)."""
    from ml.ood import FeatureGate

    try:
        from ml.ingest import load_image
    except ImportError:
        return {"skipped": "ml.ingest.load_image not available"}
    gate = FeatureGate(net, params, size)
    out: dict[str, Any] = {}
    for folder in ("dicom", "kermany_fullres", "nih_cxr14_fullres"):
        csv_path = data_dir / folder / "labels.csv"
        if not csv_path.exists():
            continue
        import csv

        rows = list(csv.DictReader(open(csv_path, newline="")))
        res = []
        for r in rows:
            try:
                img = load_image((data_dir / folder / r["file"]).read_bytes(), max_bytes=1 << 30, max_pixels=1 << 28)
                g = gate.check(img)
                res.append({"file": r["file"], "passed": g.passed, "score": round(g.score, 4), "reason": g.reason})
            except Exception as exc:  # refused at ingest: report it, it is not the gate's decision
                res.append({"file": r["file"], "ingest_error": f"{type(exc).__name__}: {exc}"[:160]})
        out[folder] = res
        if folder != "dicom":
            ok = [x["passed"] for x in res if "passed" in x]
            log(f"gate on {folder}: {sum(ok)}/{len(ok)} passed")
        else:
            for x in res:
                log(f"gate on dicom/{x['file']}: {x}")
    return out


def export(cfg: TrainConfig, net: PneumoniaNet, params: GateParams, manifest: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    state.update(params.to_state())
    path = cfg.out_dir / WEIGHTS_FILE
    save_file(state, str(path), metadata={"name": "cxr:pneumonia-v1", "architecture": manifest["architecture"]})
    path.chmod(0o644)
    manifest["sha256"] = sha256_file(path)
    manifest["size_bytes"] = path.stat().st_size
    (cfg.out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def finalize(cfg: TrainConfig, net: PneumoniaNet, images: np.ndarray, records: list[Record],
             summary: dict[str, Any], log: Log, *, started: float) -> dict[str, Any]:
    net.eval()
    cal = calibrate_and_report(net, images, records, log)
    net.temperature.fill_(cal["temperature"])
    params, gate_report = fit_gate(cfg, net, images, records, log)
    gate_report["files"] = gate_on_files(net, params, Path(cfg.data_dir), cfg.size, log)
    repo = Path(__file__).resolve().parents[2]
    manifest = {
        "name": "cxr:pneumonia-v1",
        "weights_file": WEIGHTS_FILE,
        "sha256": None,
        "architecture": summary["selected"],
        "input_size": cfg.size,
        "input_convention": "(N, 1, S, S) float32 in [-1024, 1024] (TorchXRayVision), center crop + resize",
        "labels": ["pneumonia"],
        "displays": ["Pneumonia"],
        "thresholds": [cal["threshold"]],
        "threshold_rule": f"highest threshold with sensitivity >= {SENSITIVITY_TARGET} on the cal split",
        "temperature": cal["temperature"],
        "calibration": cal["calibration"],
        "metrics": cal["metrics"],
        "ood": gate_report,
        "training": {
            "data": {"kermany_pneumonia": "CC BY 4.0 (Kermany et al., Cell 2018)",
                     "nih_cxr14": "NIH Clinical Center, no restriction (Wang et al., CVPR 2017)"},
            "splits": f"Kermany: {cfg.val_fraction:.0%} of patients (patient_key, seed {cfg.seed}) held out; NIH: "
                      "its patient-disjoint val split; each held-out set cut by patient into cal/report halves",
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
            "epochs": cfg.epochs,
            "candidate_steps": cfg.candidate_steps,
            "batch_size": cfg.batch_size,
            "frozen_layers": cfg.frozen_layers,
            "lr": {"backbone": cfg.lr, "head": cfg.head_lr, "schedule": "warmup + cosine", "weight_decay": cfg.weight_decay},
            "sampling": "per dataset, majority class subsampled to the minority's size each epoch",
            "augmentation": "affine (rot +-7 deg, scale 0.92-1.08, shift +-5%), one-axis zoom 1-1.4 on half the batch (centre-crop framing), contrast/brightness/gamma",
            "threads": cfg.threads,
            "commit": _git_commit(repo),
            "command": (f"cxr train --data {cfg.data_dir} --out {cfg.out_dir} --seed {cfg.seed} --size {cfg.size} "
                        f"--epochs {cfg.epochs} --candidate-steps {cfg.candidate_steps} "
                        f"--frozen-layers {cfg.frozen_layers} --candidates {','.join(cfg.candidates)}"),
            "candidates": summary["comparison"],
            "history": summary["history"],
            "finalize_wall_time_s": round(time.time() - started, 1),
        },
    }
    manifest = export(cfg, net, params, manifest)
    log(f"exported {cfg.out_dir / WEIGHTS_FILE} ({manifest['size_bytes'] / 1e6:.1f} MB, sha256 {manifest['sha256'][:12]})")
    return manifest
