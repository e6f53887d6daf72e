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
from ml.image import XRayImage
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
    if getattr(args, "held_out", None):
        data = Path(args.held_out)
        if not data.is_dir():
            print(f"data directory not found: {data}", file=sys.stderr)
            return 2
        model = load_model_for_eval(args.model, getattr(args, "weights_dir", None))
        held = held_out_report(data, model, limit_per_source=args.limit)
        print(json.dumps(held, indent=2) if args.json else format_held_out(held))
        return 0
    if not args.labels:
        print("give --labels LABELS.csv or --held-out DATA_DIR", file=sys.stderr)
        return 2
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


# ---- issue 11: gate false refusals, population head, adult urgent triage (held-out patients only)


def held_out_films(data_dir: Path) -> list[dict[str, Any]]:
    """Every real frontal film from patients the gate / population heads were never fitted on
    (ml/training/gate_fit.py's split): source, path, pneumonia label, age, and the true population."""
    from ml.population import ADULT, PEDIATRIC
    from ml.training.data import list_records
    from ml.training.gate_fit import hannover_fit_patients

    kroles = {r.patient: r.role for r in list_records(data_dir) if r.dataset == "kermany_pneumonia"}
    out: list[dict[str, Any]] = []

    def rows(folder: str) -> list[dict[str, str]]:
        p = data_dir / folder / "labels.csv"
        return list(csv.DictReader(open(p, newline=""))) if p.exists() else []

    for folder in ("kermany_pneumonia", "kermany_fullres"):
        for r in rows(folder):
            if kroles.get(r["patient_key"], "train") != "train":
                out.append({"source": folder, "path": data_dir / folder / r["file"], "role": kroles[r["patient_key"]],
                            "pneumonia": int(r["labels"].upper() == "PNEUMONIA"), "population": PEDIATRIC})
    for folder in ("nih_cxr14", "nih_cxr14_fullres"):
        for r in rows(folder):
            if r["split"] == "val":
                age = float(r["age"] or -1)
                out.append({"source": folder, "path": data_dir / folder / r["file"], "pneumonia": int(r["Pneumonia"] == "1"),
                            "population": ADULT if age >= 18 else None, "age": age})
    han = rows("covid19_hannover")
    fitted = hannover_fit_patients(r["patient_id"] for r in han)
    for r in han:
        if r["patient_id"] not in fitted:
            out.append({"source": "covid19_hannover", "path": data_dir / "covid19_hannover" / r["file"],
                        "pneumonia": None, "population": ADULT})
    for r in rows("dicom"):
        if "feline" not in r["file"] and "fake_monochrome1" not in r["file"]:
            out.append({"source": "dicom", "path": data_dir / "dicom" / r["file"], "pneumonia": None, "population": None})
    return out


def _wilson(k: int, n: int) -> list[float]:
    from ml.training.gate_fit import wilson

    return list(wilson(k, n))


def held_out_report(data_dir: Path, model, *, limit_per_source: int | None = None, log=None) -> dict[str, Any]:
    from ml import findings as fnd
    from ml.pipeline import Analyzer

    films = held_out_films(data_dir)
    analyzer = Analyzer(model, ood_gate=None, max_bytes=1 << 30, max_pixels=1 << 28)
    per: dict[str, dict[str, Any]] = {}
    adult = {"nih_no_pneumonia": [0, 0, 0], "nih_pneumonia": [0, 0, 0], "hannover_covid19": [0, 0, 0]}
    # every held-out film also comes back once turned (90/180/270 degrees in turn) or inverted: a
    # negative the gate must refuse (turned copy for 3 films in 4, inverted for the 4th)
    turned = {"turned": [0, 0, []], "inverted": [0, 0, []]}
    t0 = time.time()
    for i, film in enumerate(films):
        s = per.setdefault(film["source"], {"n": 0, "refused": 0, "errors": 0, "pop_n": 0, "pop_ok": 0, "refusals": [],
                                            "framed_n": 0, "framed_refused": 0, "framed_refusals": []})
        if limit_per_source is not None and s["n"] + s["errors"] >= limit_per_source:
            continue
        data, name = film["path"].read_bytes(), film["path"].name
        try:
            _copies(analyzer, data, name, i, s, turned)
            a = analyzer.analyze_bytes(data, filename=name)
        except NotChestXRay as exc:
            s["n"] += 1
            s["refused"] += 1
            s["refusals"].append(f"{name}: {exc.message}")
            continue
        except CXRError:
            s["errors"] += 1
            continue
        s["n"] += 1
        pop = a.ood.population if a.ood is not None else None
        if film["population"] is not None and pop is not None and pop.source == "image":
            s["pop_n"] += 1
            s["pop_ok"] += int(pop.population == film["population"])
        if film["population"] == "adult":
            key = ("hannover_covid19" if film["source"] == "covid19_hannover"
                   else ("nih_pneumonia" if film["pneumonia"] else "nih_no_pneumonia"))
            adult[key][0] += 1
            adult[key][1] += int(a.triage == "urgent")
            adult[key][2] += int(fnd.triage(a.findings) == "urgent")  # what it was without the population check
    analyzer.close()
    report: dict[str, Any] = {"model": model.info.name, "model_version": model.info.version,
                              "seconds": round(time.time() - t0, 1), "sources": {}, "adult_urgent": {}}
    for src, s in per.items():
        report["sources"][src] = {
            "n": s["n"], "refused": s["refused"], "false_refusal_rate": s["refused"] / s["n"] if s["n"] else None,
            "false_refusal_ci95": _wilson(s["refused"], s["n"]), "ingest_errors": s["errors"],
            "population_n": s["pop_n"], "population_accuracy": s["pop_ok"] / s["pop_n"] if s["pop_n"] else None,
            "population_ci95": _wilson(s["pop_ok"], s["pop_n"]), "refusals": s["refusals"][:10],
            "framed_n": s["framed_n"], "framed_refused": s["framed_refused"],
            "framed_false_refusal_ci95": _wilson(s["framed_refused"], s["framed_n"]),
            "framed_refusals": s["framed_refusals"][:10]}
    report["negatives"] = {kind: {"n": n, "refused": k, "refusal_rate": k / n if n else None, "ci95": _wilson(k, n),
                                  "passed": passed[:10]} for kind, (n, k, passed) in turned.items()}
    for key, (n, urgent, before) in adult.items():
        report["adult_urgent"][key] = {"n": n, "urgent": urgent, "share": urgent / n if n else None,
                                       "ci95": _wilson(urgent, n), "urgent_without_population_check": before,
                                       "share_without_population_check": before / n if n else None}
    return report


def _copies(analyzer, data: bytes, name: str, index: int, per_source: dict[str, Any],
            turned: dict[str, list]) -> None:
    """Analyse the film (decoded once) twice more: framed as servers see films
    (ml/training/gate_augment.py: a random 2-4 of aspect stretch, border, collimation, letterboxing,
    6-8-bit, small JPEG re-encode, burned-in text, another window, a few degrees of rotation; seeded
    per film) and turned by k x 90 degrees (k = index % 4 = 1..3) or inverted (k = 0). Counts refusals:
    a framed film refused is a false refusal, a turned or inverted one passed is a missed negative."""
    import zlib

    from ml.ingest import load_image
    from ml.training.gate_augment import frame_variant

    try:
        image = load_image(data, max_bytes=1 << 30, max_pixels=1 << 28, filename=name)
    except CXRError:
        return  # counted once, as the film's own ingest error
    framed = frame_variant(image.pixels, np.random.default_rng(zlib.crc32(f"framed:{index}:{name}".encode())))
    per_source["framed_n"] += 1
    refusal = _refusal(analyzer, image, framed)
    if refusal is not None:
        per_source["framed_refused"] += 1
        per_source["framed_refusals"].append(f"{name} (framed): {refusal.message}")
    k = index % 4
    kind = "inverted" if k == 0 else "turned"
    turned[kind][0] += 1
    if _refusal(analyzer, image, 1.0 - image.pixels if k == 0 else np.ascontiguousarray(np.rot90(image.pixels, k))):
        turned[kind][1] += 1
    else:
        turned[kind][2].append(f"{name}{' inverted' if k == 0 else f' turned {90 * k}'}")


def _refusal(analyzer, image: XRayImage, pixels: np.ndarray) -> NotChestXRay | None:
    """The gate's refusal of `image` with its pixels replaced (metadata kept, size updated), or None."""
    import dataclasses

    h, w = pixels.shape
    try:
        analyzer.analyze_image(XRayImage(pixels=pixels.astype(np.float32),
                                         metadata=dataclasses.replace(image.metadata, width=w, height=h)))
    except NotChestXRay as exc:
        return exc
    return None


def format_held_out(r: dict[str, Any]) -> str:
    lines = [f"model {r['model']} ({r['model_version']}); held-out patients of every shared source ({r['seconds']} s)",
             "", "OOD gate false refusals (real frontal chest films refused; Wilson 95% CI):"]
    for src, s in r["sources"].items():
        if s["n"]:
            lo, hi = s["false_refusal_ci95"]
            lines.append(f"  {src:<20} {s['refused']:>4}/{s['n']:<5} = {s['false_refusal_rate']:.2%} (95% CI {lo:.2%}-{hi:.2%})"
                         f"  pass rate {1 - s['false_refusal_rate']:.2%}")
    lines += ["", "The same films framed as servers see them (borders, collimation, letterboxing, 6-8-bit, small JPEG "
              "re-encodes, burned-in text; one random framing each), refused:"]
    for src, s in r["sources"].items():
        if s.get("framed_n"):
            lo, hi = s["framed_false_refusal_ci95"]
            k, n = s["framed_refused"], s["framed_n"]
            lines.append(f"  {src:<20} {k:>4}/{n:<5} = {k / n:.2%} (95% CI {lo:.2%}-{hi:.2%})  pass rate {1 - k / n:.2%}")
    lines += ["", "The same held-out films turned or inverted (negatives: refused; Wilson 95% CI):"]
    for kind, neg in r.get("negatives", {}).items():
        if neg["n"]:
            lo, hi = neg["ci95"]
            lines.append(f"  {kind:<20} {neg['refused']:>4}/{neg['n']:<5} = {neg['refusal_rate']:.2%} refused "
                         f"(95% CI {lo:.2%}-{hi:.2%})" + (f"; passed: {', '.join(neg['passed'])}" if neg["passed"] else ""))
    lines += ["", "Population head accuracy (films without a DICOM age; Wilson 95% CI):"]
    for src, s in r["sources"].items():
        if s["population_n"]:
            lo, hi = s["population_ci95"]
            lines.append(f"  {src:<20} {s['population_accuracy']:.2%} of {s['population_n']} (95% CI {lo:.2%}-{hi:.2%})")
    lines += ["", "Adult films triaged urgent (now vs without the population check):"]
    names = {"nih_no_pneumonia": "NIH val, adult, no pneumonia", "nih_pneumonia": "NIH val, adult, pneumonia",
             "hannover_covid19": "Hannover COVID-19 (held-out half)"}
    for key, a in r["adult_urgent"].items():
        if a["n"]:
            lo, hi = a["ci95"]
            lines.append(f"  {names[key]:<36} {a['urgent']}/{a['n']} = {a['share']:.1%} (95% CI {lo:.1%}-{hi:.1%}); "
                         f"without the check {a['urgent_without_population_check']}/{a['n']} = "
                         f"{a['share_without_population_check']:.1%}")
    for src, s in r["sources"].items():
        for x in [*s["refusals"], *s.get("framed_refusals", [])]:
            lines.append(f"refused ({src}): {x}")
    return "\n".join(lines)
