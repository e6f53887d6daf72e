"""The numbers behind the gate's orientation-consistency check (ml/ood.py, ORIENT_*).

For a sample of the gate's fit films (every Hannover fit patient and full-resolution fit film, a
seeded share of the Kermany train and NIH train films) and for every held-out film, the orientation
head's logit is computed on the film as served and on its four copies (turned 90/180/270 degrees,
inverted), each through ingest -> working image -> the bundled backbone, as the server does. Each
film's copies are negatives too: a turned copy's own copies include the upright film.

The constants come from the fit rows only: the largest gap (best copy minus own) of a fit chest
film, the smallest gap of a fit turned / inverted copy, the largest own logit of a fit turned /
inverted copy. The held-out rows are printed for the model card, never used for a choice.

    python -m ml.training.gate_orientation --cache /tmp/cxr-gate-cache --data ../shared/data --out /tmp/orientation.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLE = {"kermany_pneumonia": 0.06, "nih_cxr14": 0.12}  # share of the big fit sources, seeded


def _films(cache: Path, data: Path, seed: int) -> list[tuple[dict[str, Any], str]]:
    from ml.training.gate_features import load_cache
    from ml.training.gate_fit import assign_sides

    _, meta = load_cache(cache)
    side = assign_sides(meta, data)
    rng = np.random.default_rng(seed)
    out = []
    for m, s in zip(meta, side, strict=True):
        if m.get("variant") != "orig":
            continue
        if s == "fit":
            if rng.random() < SAMPLE.get(m["source"], 1.0):
                out.append((m, "fit"))
        elif m["source"] != "dicom" or ("feline" not in m["file"] and "fake_monochrome1" not in m["file"]):
            out.append((m, "held"))  # the cat and the re-tagged inverted film are negatives, not films
    return out


def orientation_logits(films: list[tuple[dict[str, Any], str]], data: Path, log) -> list[dict[str, Any]]:
    """Per film: logits of [as served, turned 90, 180, 270, inverted]."""
    from ml.ingest import load_image
    from ml.ood import load_gate_state, orientation_copies, GateParams
    from ml.pipeline import working_image
    from ml.training.gate_features import Extractor

    params = GateParams.from_state(load_gate_state(Path(__file__).resolve().parents[1] / "models" / "weights"))
    ex = Extractor(160)
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for i, (m, side) in enumerate(films):
        try:
            img = load_image((data / m["source"] / m["file"]).read_bytes(), max_bytes=1 << 30, max_pixels=1 << 28,
                             filename=m["file"], target_size=ex.size)
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            log(f"{m['source']}/{m['file']}: ingest error {exc}")
            continue
        px = working_image(img, ex.size).pixels
        z = params.orientation_logit(ex.features([px, *orientation_copies(px)]).astype(np.float64))
        rows.append({"source": m["source"], "file": m["file"], "side": side, "z": z.tolist()})
        if i % 500 == 0:
            log(f"{i}/{len(films)} films, {time.time() - t0:.0f}s")
    return rows


def pairs(rows: list[dict[str, Any]], side: str) -> dict[str, np.ndarray]:
    """(own, gap) arrays for the films ('film') and their turned / inverted copies ('copy')."""
    film, copy = [], []
    for r in rows:
        if r["side"] != side:
            continue
        z = np.array(r["z"])
        film.append((z[0], z[1:].max() - z[0]))
        for k in (1, 2, 3):  # a turned copy's copies: the other turns and the upright film
            copy.append((z[k], max(z[(k + j) % 4] for j in (1, 2, 3)) - z[k]))
        copy.append((z[4], z[0] - z[4]))  # an inverted copy's inverse is the film
    return {"film": np.array(film), "copy": np.array(copy)}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from ml.ood import ORIENT_CONFIDENT, ORIENT_MARGIN, ORIENT_OVERTURN
    from ml.training.gate_fit import wilson

    fit = pairs(rows, "fit")
    out: dict[str, Any] = {"fit": {
        "films": len(fit["film"]), "copies": len(fit["copy"]),
        "largest_film_gap": float(fit["film"][:, 1].max()),
        "smallest_copy_gap": float(fit["copy"][:, 1].min()),
        "largest_copy_own": float(fit["copy"][:, 0].max()),
        "films_own_below_confident": float(np.mean(fit["film"][:, 0] < ORIENT_CONFIDENT)),
    }}

    def refused(own: np.ndarray, gap: np.ndarray) -> np.ndarray:
        edge = np.where(own >= 0, ORIENT_MARGIN, -ORIENT_OVERTURN)
        return (own < ORIENT_CONFIDENT) & (gap > edge)

    for side in ("fit", "held"):
        p = pairs(rows, side)
        f_ref = int(refused(p["film"][:, 0], p["film"][:, 1]).sum())
        c_ref = int(refused(p["copy"][:, 0], p["copy"][:, 1]).sum())
        out[side] = out.get(side, {}) | {
            "films_refused_by_orientation": [f_ref, len(p["film"]), wilson(f_ref, len(p["film"]))],
            "copies_refused_by_orientation": [c_ref, len(p["copy"]), wilson(c_ref, len(p["copy"]))],
            "films_refused_by_own_logit_alone": int((p["film"][:, 0] < 0).sum()),
            "copies_passed_by_own_logit_alone": int((p["copy"][:, 0] >= 0).sum()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", required=True, help="ml.training.gate_features cache (for the film list and split)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, help="JSON with every film's five logits and the summary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    rows = orientation_logits(_films(Path(args.cache), Path(args.data), args.seed), Path(args.data), log)
    result = {"summary": summary(rows), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
