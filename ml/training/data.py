"""Training data: which images, which patient-disjoint split, and a uint8 cache of model inputs.

Every image goes through ml.preprocess.to_model_input (the server's own preprocessing), once, and
is stored as uint8 so an epoch on two CPU cores costs only the network. Splits:
  - Kermany: a seeded `val_fraction` of patients (patient_key) is held out, the rest trains.
  - NIH: its own patient-disjoint `split` column (train / val).
  - Each held-out set is cut again by patient into "cal" (model selection, temperature,
    threshold) and "report" (metrics we publish; never used for any choice).
  - covid19_hannover is never trained on: a chest-but-unlike-training check for the OOD gate.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ml.preprocess import XRV_MAX, to_model_input

ROLES = ("train", "cal", "report", "extra")


@dataclass
class Record:
    dataset: str
    file: str  # path relative to the data dir
    label: int  # 1 = pneumonia
    role: str  # one of ROLES
    patient: str
    subtype: str  # kermany: bacteria/virus/normal; nih: pipe-separated findings
    other_finding: int  # nih: 1 when some non-pneumonia finding is present


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _patient_roles(patients: list[str], held_fraction: float, seed: int) -> dict[str, str]:
    """Seeded patient -> role: `held_fraction` held out, split half cal / half report."""
    uniq = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(uniq))
    n_held = int(round(held_fraction * len(uniq)))
    roles: dict[str, str] = {}
    for rank, idx in enumerate(order):
        if rank < n_held:
            roles[uniq[idx]] = "cal" if rank % 2 == 0 else "report"
        else:
            roles[uniq[idx]] = "train"
    return roles


def list_records(data_dir: Path, *, seed: int = 0, val_fraction: float = 0.2) -> list[Record]:
    data_dir = Path(data_dir)
    records: list[Record] = []
    kdir = data_dir / "kermany_pneumonia"
    if (kdir / "labels.csv").exists():
        rows = _read_csv(kdir / "labels.csv")
        roles = _patient_roles([r["patient_key"] for r in rows], val_fraction, seed)
        for r in rows:
            records.append(
                Record("kermany_pneumonia", f"kermany_pneumonia/{r['file']}", int(r["labels"].upper() == "PNEUMONIA"),
                       roles[r["patient_key"]], r["patient_key"], r.get("subtype", ""), 0)
            )
    ndir = data_dir / "nih_cxr14"
    if (ndir / "labels.csv").exists():
        rows = _read_csv(ndir / "labels.csv")
        val_patients = [r["patient_id"] for r in rows if r["split"] == "val"]
        # All NIH val patients are held out; they are only cut into cal / report.
        roles = _patient_roles(val_patients, 1.0, seed + 1)
        for r in rows:
            findings = [f for f in r["labels"].split("|") if f]
            others = [f for f in findings if f not in ("Pneumonia", "No Finding")]
            role = roles[r["patient_id"]] if r["split"] == "val" else "train"
            records.append(
                Record("nih_cxr14", f"nih_cxr14/{r['file']}", int(r["Pneumonia"] == "1"), role,
                       r["patient_id"], r["labels"], int(bool(others)))
            )
    hdir = data_dir / "covid19_hannover"
    if (hdir / "labels.csv").exists():
        for r in _read_csv(hdir / "labels.csv"):
            records.append(Record("covid19_hannover", f"covid19_hannover/{r['file']}", -1, "extra",
                                  r["patient_id"], r["labels"], 0))
    return records


def read_pixels01(path: Path) -> np.ndarray:
    """A JPEG/PNG as float [0, 1] grey (H, W), the way ingest hands images to preprocess."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I"):
            arr = np.asarray(im, dtype=np.float32)
            return (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)
        grey = im.convert("L")
        return np.asarray(grey, dtype=np.float32) / 255.0


def to_uint8(model_input: np.ndarray) -> np.ndarray:
    """(1, S, S) float in [-1024, 1024] -> (S, S) uint8 (lossless enough for 8-bit sources)."""
    x01 = (model_input[0] + XRV_MAX) / (2 * XRV_MAX)
    return np.clip(np.rint(x01 * 255.0), 0, 255).astype(np.uint8)


def from_uint8(batch: np.ndarray) -> np.ndarray:
    """(N, S, S) uint8 -> (N, 1, S, S) float32 in [-1024, 1024]."""
    return (batch.astype(np.float32)[:, None] / 255.0) * (2 * XRV_MAX) - XRV_MAX


def build_cache(data_dir: Path, cache_dir: Path, size: int, *, seed: int = 0, val_fraction: float = 0.2,
                log=print) -> tuple[np.ndarray, list[Record]]:
    """Preprocess every record once; reuse the cache when it was built with the same settings."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    records = list_records(data_dir, seed=seed, val_fraction=val_fraction)
    key = f"s{size}_seed{seed}_v{val_fraction}_n{len(records)}"
    arr_path = cache_dir / f"images_{key}.npy"
    meta_path = cache_dir / f"records_{key}.json"
    if arr_path.exists() and meta_path.exists():
        cached = [Record(**r) for r in json.loads(meta_path.read_text())]
        if cached == records:
            return np.load(arr_path), records
    images = np.zeros((len(records), size, size), dtype=np.uint8)
    for i, rec in enumerate(records):
        x, _ = to_model_input(read_pixels01(Path(data_dir) / rec.file), size)
        images[i] = to_uint8(x)
        if (i + 1) % 1000 == 0:
            log(f"cache: {i + 1}/{len(records)} images at {size}px")
    tmp = arr_path.with_suffix(".tmp.npy")
    np.save(tmp, images)
    tmp.rename(arr_path)
    meta_path.write_text(json.dumps([asdict(r) for r in records]))
    return images, records
