"""`cxr evaluate`: labels.csv parsing and a run through the real pipeline (gate refusals counted apart)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
from PIL import Image

from ml.training.cli import main as training_main
from ml.training.evaluate import read_labels


def test_read_labels_positive_aliases_and_filters(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("file,split,labels\na.png,train,PNEUMONIA\nb.png,val,NORMAL\nc.png,val,Effusion|Pneumonia\n"
                 "d.png,val,No Finding\n")
    rows = read_labels(p, "pneumonia")
    assert [(r[0].name, r[1]) for r in rows] == [("a.png", 1), ("b.png", 0), ("c.png", 1), ("d.png", 0)]
    assert rows[0][0].parent == tmp_path
    assert [r[0].name for r in read_labels(p, "pneumonia", split="val", limit=2)] == ["b.png", "c.png"]


def test_evaluate_cli_json_counts_refusals(tmp_path, shared_data, capsys):
    src = list(csv.DictReader(open(shared_data / "nih_cxr14" / "labels.csv")))
    val = [r for r in src if r["split"] == "val"]
    picks = [next(r for r in val if r["Pneumonia"] == "1"), next(r for r in val if r["Pneumonia"] == "0")]
    rows = []
    for i, r in enumerate(picks):
        shutil.copy(shared_data / "nih_cxr14" / r["file"], tmp_path / f"img{i}.jpg")
        rows.append(f"img{i}.jpg,val,{r['labels']}")
    noise = (np.random.default_rng(0).random((300, 300)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    rows.append("noise.png,val,No Finding")
    (tmp_path / "labels.csv").write_text("file,split,labels\n" + "\n".join(rows) + "\n")

    rc = training_main(["evaluate", "--labels", str(tmp_path / "labels.csv"), "--finding", "pneumonia", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_images"] == 3 and out["n_refused_by_gate"] == 1 and out["n_scored"] == 2
    assert out["refused"][0]["file"].endswith("noise.png")
    assert out["n"] == 2 and out["n_positive"] == 1
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
        if out[key]["n"] == 0:  # e.g. no film called negative at this threshold: no interval exists
            continue
        lo, hi = out[key]["ci95"]
        assert 0.0 <= lo <= hi <= 1.0


def test_evaluate_missing_labels_file_is_an_error(tmp_path, capsys):
    assert training_main(["evaluate", "--labels", str(tmp_path / "nope.csv")]) == 2
    assert "not found" in capsys.readouterr().err
