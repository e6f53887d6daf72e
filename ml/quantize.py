"""int8 static quantization of the exported ONNX model, kept only when validation says it is harmless.

`quantize(model, ...)` (the `cxr quantize` command):
1. exports / reuses the fp32 ONNX file (ml/engine.py, same cache and key);
2. calibrates onnxruntime's static quantizer (QDQ, per-channel int8 weights, uint8 activations) on a
   few hundred *training* radiographs from the shared data;
3. computes the AUROC of fp32 and int8 on held-out radiographs for every model finding that has
   labels there (pneumonia: the Kermany + NIH held-out patients of ml.training.data; other
   findings: the NIH `val` split) and writes the int8 file and a JSON report next to the fp32 file.

The int8 model is *accepted* when every validated finding's AUROC drops by <= 0.005, its threshold
decisions agree with fp32's on >= 98% of the held-out films, and at least one finding could be
validated. At serve time CXR_PRECISION=int8 uses the int8 file only when its
report says accepted (ml.engine.build_engine); otherwise it logs why and serves fp32.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml.models.base import LoadedModel
from ml.preprocess import to_model_input

log = logging.getLogger(__name__)

MAX_AUROC_DROP = 0.005
MIN_CLASS_COUNT = 10  # a finding needs this many positives and negatives to be validated
# AUROC only sees the ranking; int8 can also shift calibrated probabilities across the operating
# threshold (measured: up to 0.16 on single films), so decisions must agree too.
MIN_DECISION_AGREEMENT = 0.98


@dataclass(frozen=True)
class Labelled:
    path: Path
    y: int


def int8_paths(fp32_path: Path) -> tuple[Path, Path]:
    stem = fp32_path.with_suffix("")
    return stem.with_name(stem.name + "-int8.onnx"), stem.with_name(stem.name + "-int8.json")


def accepted_int8(fp32_path: Path) -> tuple[Path | None, str]:
    """(the int8 file, why) when its validation report accepts it; (None, why not) otherwise."""
    model_path, report_path = int8_paths(fp32_path)
    if not (model_path.is_file() and report_path.is_file()):
        return None, f"no validated int8 model at {model_path} (run `cxr quantize`)"
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable int8 report {report_path}: {exc}"
    if not report.get("accepted"):
        return None, f"int8 rejected by validation: {report.get('reason', 'see ' + str(report_path))}"
    return model_path, "accepted"


def _pixels01(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _inputs(items: list[Path], size: int) -> np.ndarray:
    return np.stack([to_model_input(_pixels01(p), size)[0] for p in items]).astype(np.float32)


def calibration_files(data_dir: Path, count: int, *, seed: int = 0) -> list[Path]:
    """`count` training-role radiographs (never the held-out ones used for validation)."""
    files: list[Path] = []
    try:
        from ml.training.data import list_records

        files = [data_dir / r.file for r in list_records(data_dir) if r.role == "train"]
    except ImportError:
        pass
    if not files:
        nih = data_dir / "nih_cxr14" / "labels.csv"
        if nih.is_file():
            with nih.open(newline="") as fh:
                files = [nih.parent / r["file"] for r in csv.DictReader(fh) if r["split"] == "train"]
    if not files:
        return []
    order = np.random.default_rng(seed).permutation(len(files))[:count]
    return [files[i] for i in sorted(order)]


def validation_sets(data_dir: Path, labels: tuple[str, ...], *, limit: int) -> dict[str, list[Labelled]]:
    """Held-out labelled radiographs per model finding (at most `limit` each)."""
    from ml.models.xrv import snake_label

    out: dict[str, list[Labelled]] = {label: [] for label in labels}
    if "pneumonia" in out:
        try:
            from ml.training.data import list_records

            out["pneumonia"] += [
                Labelled(data_dir / r.file, r.label)
                for r in list_records(data_dir)
                if r.role in ("cal", "report") and r.label in (0, 1)
            ]
        except ImportError:
            pass
    nih = data_dir / "nih_cxr14" / "labels.csv"
    if nih.is_file():
        with nih.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
        seen = {item.path for items in out.values() for item in items}
        for column in rows[0].keys() if rows else ():
            label = snake_label(column)
            if label in out:
                for r in rows:
                    path = nih.parent / r["file"]
                    if r[column] in ("0", "1") and path not in seen:
                        out[label].append(Labelled(path, int(r[column])))
    rng = np.random.default_rng(0)
    for label, items in out.items():
        if len(items) > limit:
            out[label] = [items[i] for i in sorted(rng.permutation(len(items))[:limit])]
    return out


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted half."""
    pos, neg = p[y == 1], p[y == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _predict(session, batch: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run(["probs"], {"x": batch[i : i + 16]})[0] for i in range(0, len(batch), 16)])


def quantize(
    model: LoadedModel, *, cache_dir: Path, data_dir: Path, calibration: int = 300, validation_limit: int = 600
) -> dict[str, Any]:
    """Calibrate, quantize, validate; write the int8 model + report; return the report."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ml.engine import cached_export

    fp32 = cached_export(model, cache_dir)
    int8, report_path = int8_paths(fp32)
    files = calibration_files(data_dir, calibration)
    if not files:
        raise FileNotFoundError(f"no training radiographs under {data_dir} to calibrate on")
    calib = _inputs(files, model.input_size)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(len(calib)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self._it, None)
            return None if i is None else {"x": calib[i : i + 1]}

    pre = int8.with_name(f".{int8.name}.{os.getpid()}.pre.onnx")
    tmp = int8.with_name(f".{int8.name}.{os.getpid()}.tmp")
    try:
        quant_pre_process(str(fp32), str(pre))
        quantize_static(
            str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )
        os.replace(tmp, int8)
    finally:
        pre.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)

    fp32_s, int8_s = _session(fp32), _session(int8)
    findings: dict[str, Any] = {}
    for index, (label, items) in enumerate(validation_sets(data_dir, model.labels, limit=validation_limit).items()):
        y = np.array([it.y for it in items], dtype=np.int64)
        if (y == 1).sum() < MIN_CLASS_COUNT or (y == 0).sum() < MIN_CLASS_COUNT:
            findings[label] = {"validated": False, "n": len(items), "positives": int((y == 1).sum())}
            continue
        x = _inputs([it.path for it in items], model.input_size)
        col = model.labels.index(label)
        p32, p8 = _predict(fp32_s, x)[:, col], _predict(int8_s, x)[:, col]
        a32, a8 = auroc(y, p32), auroc(y, p8)
        threshold = model.thresholds[col]
        findings[label] = {
            "validated": True, "n": len(items), "positives": int(y.sum()),
            "auroc_fp32": round(a32, 5), "auroc_int8": round(a8, 5), "drop": round(a32 - a8, 5),
            "max_abs_prob_diff": round(float(np.abs(p32 - p8).max()), 5),
            "mean_abs_prob_diff": round(float(np.abs(p32 - p8).mean()), 5),
            "decision_agreement": round(float(((p32 >= threshold) == (p8 >= threshold)).mean()), 5),
        }
    validated = {k: v for k, v in findings.items() if v["validated"]}
    failing = [k for k, v in validated.items() if v["drop"] > MAX_AUROC_DROP]
    failing += [k for k, v in validated.items() if v["decision_agreement"] < MIN_DECISION_AGREEMENT and k not in failing]
    if not validated:
        accepted, reason = False, "no finding has enough held-out labels to validate int8"
    elif failing:
        accepted, reason = False, (f"AUROC drop > {MAX_AUROC_DROP} or threshold decisions agreeing on < "
                                   f"{MIN_DECISION_AGREEMENT:.0%} of films for {', '.join(failing)}")
    else:
        accepted, reason = True, (f"every validated finding's AUROC drop <= {MAX_AUROC_DROP} and decisions agree "
                                  f"on >= {MIN_DECISION_AGREEMENT:.0%} of films")
    report = {
        "model": model.info.name, "model_version": model.info.version, "fp32_file": fp32.name,
        "int8_file": int8.name, "calibration_images": len(files), "max_auroc_drop": MAX_AUROC_DROP,
        "accepted": accepted, "reason": reason, "findings": findings,
    }
    report_path.write_text(json.dumps(report, indent=2))
    log.info("int8 %s for %s: %s", "accepted" if accepted else "REJECTED", model.info.name, reason)
    return report
