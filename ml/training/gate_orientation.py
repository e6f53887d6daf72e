"""The numbers behind the gate's orientation-consistency check (ml/ood.py, ORIENT_*).

For a sample of the gate's fit films (every Hannover fit patient and full-resolution fit film, a
seeded share of the Kermany train and NIH train films) and for every held-out film, the orientation
head's logit is computed on the film as served and on its four copies (turned 90/180/270 degrees,
inverted), and the same for one framed version of the film (ml/training/gate_augment.py, seeded),
each through ingest -> working image -> the bundled backbone, as the server does; with each, whether
the chest-vs-not and distance checks let it through. Each film's copies are negatives too: a turned
copy's own copies include the upright film.

The constants come from the fit rows only: the largest gap (best copy minus own) of a fit chest
film, the smallest gap of a fit turned / inverted copy, the largest own logit of a fit copy that the
other checks let through. The held-out rows are printed for the model card, never used for a choice.
`--rows` re-summarises an earlier output under the current constants without recomputing.

    python -m ml.training.gate_orientation --cache /tmp/cxr-gate-cache --data ../shared/data --out /tmp/orientation.json
    python -m ml.training.gate_orientation --rows /tmp/orientation.json --out /tmp/orientation-summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
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
    from ml.ood import GATE_THRESHOLD, GateParams, load_gate_state, orientation_copies
    from ml.pipeline import working_image
    from ml.training.gate_augment import frame_variant
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
        framed = frame_variant(px, np.random.default_rng(zlib.crc32(f"orientation:{m['source']}:{m['file']}".encode())))
        feats = ex.features([px, *orientation_copies(px), framed, *orientation_copies(framed)]).astype(np.float64)
        z = params.orientation_logit(feats)
        head, dist = params.scores(feats)
        other_checks = (head >= GATE_THRESHOLD) & (dist >= GATE_THRESHOLD)  # what orientation is left to decide
        for variant, sl in (("orig", slice(0, 5)), ("framed", slice(5, 10))):
            rows.append({"source": m["source"], "file": m["file"], "side": side, "variant": variant,
                         "z": z[sl].tolist(), "other_checks_pass": other_checks[sl].tolist()})
        if i % 500 == 0:
            log(f"{i}/{len(films)} films, {time.time() - t0:.0f}s")
    return rows


def pairs(rows: list[dict[str, Any]], side: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """(own, gap, other checks pass) rows for the films ('film') and their turned / inverted copies
    ('copy'); films as served ('orig'), framed as servers see them ('framed',
    ml/training/gate_augment.py) or both. 'other checks pass': the chest-vs-not and distance checks
    let it through, so the orientation check alone decides."""
    film, copy = [], []
    for r in rows:
        if r["side"] != side or (variant is not None and r.get("variant", "orig") != variant):
            continue
        z = np.array(r["z"])
        ok = r.get("other_checks_pass", [True] * 5)
        film.append((z[0], z[1:].max() - z[0], ok[0]))
        for k in (1, 2, 3):  # a turned copy's copies: the other turns and the upright film
            copy.append((z[k], max(z[(k + j) % 4] for j in (1, 2, 3)) - z[k], ok[k]))
        copy.append((z[4], z[0] - z[4], ok[4]))  # an inverted copy's inverse is the film
    return {"film": np.array(film, dtype=np.float64).reshape(-1, 3), "copy": np.array(copy, dtype=np.float64).reshape(-1, 3)}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from ml.ood import ORIENT_CONFIDENT, orientation_refused
    from ml.training.gate_fit import wilson

    fit = pairs(rows, "fit", "orig")
    out: dict[str, Any] = {"fit": {
        "films": len(fit["film"]), "copies": len(fit["copy"]),
        "largest_film_gap": float(fit["film"][:, 1].max()),
        "smallest_copy_gap": float(fit["copy"][:, 1].min()),
        "largest_copy_own": float(fit["copy"][:, 0].max()),
        "films_own_below_confident": float(np.mean(fit["film"][:, 0] < ORIENT_CONFIDENT)),
    }}

    framed = pairs(rows, "fit", "framed")
    if len(framed["film"]):
        out["fit"] |= {"largest_framed_film_gap": float(framed["film"][:, 1].max()),
                       "smallest_framed_copy_gap": float(framed["copy"][:, 1].min()),
                       "largest_framed_copy_own": float(framed["copy"][:, 0].max())}
    both = pairs(rows, "fit")
    passing = both["copy"][both["copy"][:, 2] > 0]  # copies only the orientation check can refuse
    out["fit"]["largest_own_of_a_copy_the_other_checks_pass"] = float(passing[:, 0].max()) if len(passing) else None
    for side, variant in (("fit", "orig"), ("fit", "framed"), ("held", "orig"), ("held", "framed")):
        p = pairs(rows, side, variant)
        if not len(p["film"]):
            continue
        film_or = orientation_refused(p["film"][:, 0], p["film"][:, 1])
        copy_or = orientation_refused(p["copy"][:, 0], p["copy"][:, 1])
        f_ref, c_ref = int(film_or.sum()), int(copy_or.sum())
        gate_f = int((film_or | (p["film"][:, 2] == 0)).sum())  # or refused by the chest / distance checks
        gate_c = int((copy_or | (p["copy"][:, 2] == 0)).sum())
        out[f"{side} ({variant})"] = {
            "films_refused_by_the_gate": [gate_f, len(p["film"]), wilson(gate_f, len(p["film"]))],
            "copies_refused_by_the_gate": [gate_c, len(p["copy"]), wilson(gate_c, len(p["copy"]))],
            "films_compared": float(np.mean(p["film"][:, 0] < ORIENT_CONFIDENT)),
            "films_refused_by_orientation": [f_ref, len(p["film"]), wilson(f_ref, len(p["film"]))],
            "copies_refused_by_orientation": [c_ref, len(p["copy"]), wilson(c_ref, len(p["copy"]))],
            "films_refused_by_own_logit_alone": int((p["film"][:, 0] < 0).sum()),
            "copies_passed_by_own_logit_alone": int((p["copy"][:, 0] >= 0).sum()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default=None, help="ml.training.gate_features cache (for the film list and split)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", required=True, help="JSON with every film's five logits and the summary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default=None, help="an earlier --out JSON: summarise its logits instead of computing them")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    if args.rows:  # re-summarise logits computed earlier (the constants in ml/ood.py may have changed)
        rows = json.loads(Path(args.rows).read_text())["rows"]
    else:
        rows = orientation_logits(_films(Path(args.cache), Path(args.data), args.seed), Path(args.data), log)
    result = {"summary": summary(rows), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
