"""Pooled backbone features of every shared film (as served, framed differently, inverted, turned)
and of the generated negatives, computed once and cached as npz, so the gate and the population
head are fitted and evaluated in seconds.

Every film goes through ml.ingest.load_image on its bytes and pipeline.working_image, exactly like
an upload; the features are those the serving pipeline hands the gate (the bundled network's
global-average-pooled last block at the model's input size). One npz per source and chunk (the
cache is resumable: a finished chunk is never recomputed).

Rows carry: source, file, patient, age (years, -1 unknown), label (pneumonia 1/0, -1 unknown),
variant ("orig", "frame", "inv", "inv_frame", "rot90"/"rot180"/"rot270", or "neg:<category>"),
holdout (generated negatives: source held out from fitting).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.image import XRayImage
from ml.pipeline import working_image
from ml.preprocess import to_model_input
from ml.training.gate_augment import frame_variant

SOURCES = ("kermany_pneumonia", "nih_cxr14", "covid19_hannover", "kermany_fullres", "nih_cxr14_fullres", "dicom")
# framed copies per film: the small adult sets get more so the fit sees enough adult framing
FRAMES = {"kermany_pneumonia": 1, "nih_cxr14": 3, "covid19_hannover": 3, "kermany_fullres": 4,
          "nih_cxr14_fullres": 4, "dicom": 6}
CHUNK = 1000


def _rows(data_dir: Path, source: str) -> list[dict[str, str]]:
    with open(data_dir / source / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _patient(source: str, r: dict[str, str]) -> str:
    if source.startswith("kermany"):
        return r["patient_key"]
    if source.startswith("nih") or source == "covid19_hannover":
        return r["patient_id"]
    return r["file"]


def _age(r: dict[str, str]) -> float:
    try:
        return float(r.get("age") or -1)
    except ValueError:
        return -1.0


def _label(source: str, r: dict[str, str]) -> int:
    labels = {x.strip().lower() for x in (r.get("labels") or "").split("|")}
    if source.startswith("kermany") or source.startswith("nih"):
        return int("pneumonia" in labels)
    return -1


class Extractor:
    def __init__(self, size: int) -> None:
        from ml.models.bundled import load_bundled

        self.model = load_bundled()
        self.net = self.model.network.eval()
        self.size = size

    def features(self, pixels: list[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(pixels), 32):
            x = np.stack([to_model_input(p, self.size)[0] for p in pixels[i:i + 32]]).astype(np.float32)
            with torch.no_grad():
                out.append(self.net.pooled(torch.from_numpy(x)).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1280), np.float32)


def _variants(px: np.ndarray, idx: int, n_frames: int, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    out = [("orig", px)]
    out += [("frame", frame_variant(px, rng)) for _ in range(n_frames)]
    if idx % 3 == 0:  # inverted films (a negative the gate should refuse)
        out.append(("inv", 1.0 - px))
    if idx % 3 == 1:
        out.append(("inv_frame", 1.0 - frame_variant(px, rng)))
    if idx % 4 == 0:
        k = 1 + (idx // 4) % 3
        out.append((f"rot{90 * k}", np.ascontiguousarray(np.rot90(px, k))))
    return out


def extract_source(ex: Extractor, data_dir: Path, source: str, out_dir: Path, log) -> None:
    from ml.ingest import load_image

    rows = _rows(data_dir, source)
    for c0 in range(0, len(rows), CHUNK):
        path = out_dir / f"{source}_{c0 // CHUNK:03d}.npz"
        if path.exists():
            continue
        t0 = time.time()
        meta: list[dict[str, Any]] = []
        pixels: list[np.ndarray] = []
        for i in range(c0, min(len(rows), c0 + CHUNK)):
            r = rows[i]
            rng = np.random.default_rng(zlib.crc32(f"{source}:{i}".encode()))
            try:
                img = load_image((data_dir / source / r["file"]).read_bytes(), max_bytes=1 << 30,
                                 max_pixels=1 << 28, filename=r["file"], target_size=ex.size)
            except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                log(f"{source}/{r['file']}: ingest error {exc}")
                continue
            img = working_image(img, ex.size)
            base = {"source": source, "file": r["file"], "patient": _patient(source, r), "age": _age(r),
                    "label": _label(source, r), "holdout": False, "view": r.get("view") or r.get("projection") or "",
                    "colorfulness": float(img.metadata.extra.get("colorfulness", "0") or 0)}
            for name, px in _variants(img.pixels, i, FRAMES[source], rng):
                meta.append(base | {"variant": name})
                pixels.append(px)
        feats = ex.features(pixels)
        np.savez(path, feats=feats.astype(np.float32), meta=json.dumps(meta))
        log(f"{path.name}: {len(meta)} rows in {time.time() - t0:.0f}s")


def extract_negatives(ex: Extractor, out_dir: Path, log) -> None:
    from ml.training.ood_negatives import build_negatives

    path = out_dir / "negatives_000.npz"
    if path.exists():
        return
    t0 = time.time()
    negs = build_negatives(small=False, seed=0)
    meta = [{"source": n.source, "file": "", "patient": n.source, "age": -1.0, "label": -1, "holdout": n.holdout,
             "view": "", "colorfulness": 0.0, "variant": f"neg:{n.category}"} for n in negs]
    feats = ex.features([n.pixels for n in negs])
    np.savez(path, feats=feats.astype(np.float32), meta=json.dumps(meta))
    log(f"{path.name}: {len(meta)} rows in {time.time() - t0:.0f}s")


def extract_more_negatives(ex: Extractor, out_dir: Path, log, seed: int = 1) -> None:
    """More fitting negatives from another seed: rendered documents / screenshots / patterns and the
    fit photo and DICOM sources; every source the held-out part uses is left out."""
    from ml.training.ood_negatives import DICOM_HOLDOUT, DOCS_HOLDOUT_SKIMAGE, PHOTOS_HOLDOUT, build_negatives

    path = out_dir / f"negatives_{seed:03d}.npz"
    if path.exists():
        return
    t0 = time.time()
    held = {f"skimage:{n}" for n in (*PHOTOS_HOLDOUT, *DOCS_HOLDOUT_SKIMAGE)} | {f"pydicom:{n}" for n in DICOM_HOLDOUT}
    negs = [n for n in build_negatives(small=False, seed=seed) if n.source not in held]
    meta = [{"source": f"{n.source}:seed{seed}", "file": "", "patient": f"{n.source}:seed{seed}", "age": -1.0,
             "label": -1, "holdout": False, "view": "", "colorfulness": 0.0, "variant": f"neg:{n.category}"}
            for n in negs]
    feats = ex.features([n.pixels for n in negs])
    np.savez(path, feats=feats.astype(np.float32), meta=json.dumps(meta))
    log(f"{path.name}: {len(meta)} rows in {time.time() - t0:.0f}s")


def load_cache(cache_dir: Path) -> tuple[np.ndarray, list[dict[str, Any]]]:
    feats, meta = [], []
    for p in sorted(Path(cache_dir).glob("*.npz")):
        z = np.load(p)
        feats.append(z["feats"])
        meta += json.loads(str(z["meta"]))
    return np.concatenate(feats).astype(np.float64), meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    ex = Extractor(160)
    extract_negatives(ex, out, log)
    extract_more_negatives(ex, out, log)
    for source in ("dicom", "nih_cxr14_fullres", "kermany_fullres", "covid19_hannover", "nih_cxr14", "kermany_pneumonia"):
        if (Path(args.data) / source / "labels.csv").exists():
            extract_source(ex, Path(args.data), source, out, log)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
