"""`cxr evaluate`: a model's metrics on a labels.csv folder, through the server's own pipeline.

Every image goes through ml.pipeline.Analyzer.analyze_bytes on the file's bytes (ingest, OOD gate,
preprocess, model, thresholds), exactly as an upload would. Images the gate refuses, and files that
ingest rejects, are counted and listed separately: they have no probability to score.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ml.errors import CXRError, NotChestXRay
from ml.training.metrics import binary_report

POSITIVE_ALIASES = {"pneumonia"}


def _norm(s: str) -> str:
    return s.strip().lower().replace(" ", "_").replace("-", "_")


def role_files(labels_path: Path, role: str, *, seed: int, val_fraction: float) -> set[str]:
    """Files (relative to the labels folder) that `cxr train` put in `role` (train/cal/report)."""
    from ml.training.data import list_records

    folder = labels_path.resolve().parent
    prefix = folder.name + "/"
    return {r.file[len(prefix):] for r in list_records(folder.parent, seed=seed, val_fraction=val_fraction)
            if r.role == role and r.file.startswith(prefix)}


def read_labels(path: Path, finding: str, *, split: str | None = None, limit: int | None = None,
                only_files: set[str] | None = None) -> list[tuple[Path, int]]:
    """(image path, 0/1) rows: positive when `finding` is among the pipe-separated labels."""
    want = _norm(finding)
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if split is not None and r.get("split", "") != split:
                continue
            if only_files is not None and r["file"] not in only_files:
                continue
            labels = {_norm(x) for x in (r.get("labels") or "").split("|") if x.strip()}
            rows.append((path.parent / r["file"], int(want in labels)))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def load_model_for_eval(name: str, weights_dir: str | None):
    if name == "cxr:pneumonia-v1":
        from ml.models.bundled import load_bundled

        return load_bundled(name, weights_dir=Path(weights_dir) if weights_dir else None)
    from ml.models.registry import load_model

    wdir = Path(weights_dir or os.environ.get("CXR_WEIGHTS_DIR", "~/.cxr/weights")).expanduser()
    return load_model(name, weights_dir=wdir)


def evaluate(rows: list[tuple[Path, int]], model, finding: str, *, max_bytes: int = 64 << 20,
             max_pixels: int = 50_000_000) -> dict[str, Any]:
    from ml.pipeline import Analyzer

    label = _norm(finding)
    if label not in model.labels:
        raise SystemExit(f"model {model.info.name} has no finding {label!r}; it has: {', '.join(model.labels)}")
    threshold = model.thresholds[model.labels.index(label)]
    analyzer = Analyzer(model, ood_gate=None, max_bytes=max_bytes, max_pixels=max_pixels)
    ys, ps, refused, errors = [], [], [], []
    t0 = time.time()
    for path, y in rows:
        try:
            analysis = analyzer.analyze_bytes(path.read_bytes(), filename=path.name)
        except NotChestXRay as exc:
            refused.append({"file": str(path), "label": y, "reason": exc.message})
            continue
        except CXRError as exc:
            errors.append({"file": str(path), "label": y, "error": f"{exc.code}: {exc.message}"})
            continue
        prob = next(f.probability for f in analysis.findings if f.label == label)
        ys.append(y)
        ps.append(prob)
    analyzer.close()
    y_arr, p_arr = np.array(ys, dtype=np.int64), np.array(ps, dtype=np.float64)
    report: dict[str, Any] = {
        "model": model.info.name,
        "model_version": model.info.version,
        "finding": label,
        "n_images": len(rows),
        "n_scored": int(len(y_arr)),
        "n_refused_by_gate": len(refused),
        "n_ingest_errors": len(errors),
        "seconds": round(time.time() - t0, 1),
    }
    if len(y_arr):
        report.update(binary_report(y_arr, p_arr, threshold))
    report["refused"] = refused
    report["errors"] = errors
    return report


def _fmt(m: dict[str, Any]) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.4f} (95% CI {lo:.4f}-{hi:.4f})"


def format_text(r: dict[str, Any]) -> str:
    lines = [
        f"model {r['model']} ({r['model_version']}), finding {r['finding']}",
        f"images {r['n_images']}: scored {r['n_scored']}, refused by OOD gate {r['n_refused_by_gate']}, "
        f"ingest errors {r['n_ingest_errors']}",
    ]
    if r.get("n"):
        lines += [
            f"n = {r['n']} (positives {r['n_positive']}), threshold {r['threshold']:.4f}",
            f"AUROC        {_fmt(r['auroc'])}  [bootstrap]",
        ]
        for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
            m = r[k]
            lines.append(f"{k:<12} {_fmt(m)}  [{m['k']}/{m['n']}, Wilson]")
        lines.append(f"ECE (15 bins) {r['ece']:.4f}")
    for x in r["refused"][:20]:
        lines.append(f"refused: {x['file']}: {x['reason']}")
    for x in r["errors"][:20]:
        lines.append(f"error: {x['file']}: {x['error']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    path = Path(args.labels)
    if not path.is_file():
        print(f"labels file not found: {path}", file=sys.stderr)
        return 2
    only = None
    if getattr(args, "role", None):
        # The same patient split `cxr train` used (seed and held-out share from the model manifest).
        from ml.models.bundled import WEIGHTS_DIR, read_manifest

        wdir = Path(args.weights_dir) if getattr(args, "weights_dir", None) else WEIGHTS_DIR
        training = read_manifest(wdir).get("training", {})
        only = role_files(path, args.role, seed=int(training.get("seed", 0)),
                          val_fraction=float(training.get("val_fraction", 0.2)))
    rows = read_labels(path, args.finding, split=args.split, limit=args.limit, only_files=only)
    if not rows:
        print(f"no rows selected from {path}", file=sys.stderr)
        return 2
    model = load_model_for_eval(args.model, getattr(args, "weights_dir", None))
    report = evaluate(rows, model, args.finding)
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return 0
