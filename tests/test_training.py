"""`cxr train` end to end on a tiny generated dataset (one step per epoch), and the data splits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.training.cli import main as training_main
from ml.training.data import list_records


def make_tiny_dataset(root: Path, patients: int = 8, per_patient: int = 2) -> Path:
    """A kermany-shaped folder of small synthetic 'films': brighter lungs for pneumonia."""
    rng = np.random.default_rng(0)
    folder = root / "kermany_pneumonia"
    rows = []
    for p in range(patients):
        label = "PNEUMONIA" if p % 2 else "NORMAL"
        for k in range(per_patient):
            img = rng.normal(90 if label == "NORMAL" else 150, 30, (72, 80)).clip(0, 255).astype(np.uint8)
            rel = f"images/{label}/p{p}-{k}.jpeg"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).convert("RGB").save(folder / rel)
            rows.append({"file": rel, "split": "train", "labels": label,
                         "subtype": "bacteria" if p % 2 else "normal", "patient_key": f"P{p}"})
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_splits_are_patient_disjoint(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", patients=20)
    records = list_records(data, seed=0, val_fraction=0.4)
    roles_by_patient: dict[str, set[str]] = {}
    for r in records:
        roles_by_patient.setdefault(r.patient, set()).add(r.role)
    assert all(len(roles) == 1 for roles in roles_by_patient.values())
    roles = {next(iter(v)) for v in roles_by_patient.values()}
    assert roles == {"train", "cal", "report"}
    # same seed, same split
    assert [r.role for r in list_records(data, seed=0, val_fraction=0.4)] == [r.role for r in records]


def test_train_smoke_writes_verified_bundle(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    out = tmp_path / "out"
    rc = training_main([
        "train", "--data", str(data), "--out", str(out), "--size", "64", "--epochs", "1",
        "--candidate-steps", "1", "--candidates", "mobilenet_v2", "--max-steps", "1", "--threads", "1",
        "--val-fraction", "0.5", "--ood-negatives", "small", "--batch-size", "4",
    ])
    assert rc == 0
    manifest = json.loads((out / "cxr-pneumonia-v1.json").read_text())
    assert manifest["architecture"] == "mobilenet_v2" and manifest["input_size"] == 64
    assert len(manifest["sha256"]) == 64 and 0.0 <= manifest["thresholds"][0] <= 1.0
    assert manifest["temperature"] > 0

    from ml.models.bundled import load_bundled

    model = load_bundled(weights_dir=out)
    assert model.input_size == 64 and model.labels == ("pneumonia",)
    import torch

    p = model.network(torch.zeros(2, 1, 64, 64))
    assert p.shape == (2, 1) and bool(((p >= 0) & (p <= 1)).all())
