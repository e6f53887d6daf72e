"""`cxr bench`: p50/p95 latency of the whole predict path (Analyzer.analyze_bytes, decode included).

Inputs are generated in memory from one real radiograph (../shared/data when present; otherwise a
synthetic chest-like image): a ~256 px PNG, a 1024 px PNG and a 2500x2000 12-bit DICOM (16-bit
storage). Each is timed without heatmaps and with one heatmap (regions for detected findings are
part of both, as in the API).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from fhir_server.settings import Settings

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TARGET_P50_MS = {"no heatmap": 200.0, "1 heatmap": 400.0}  # for the large DICOM, on 2 CPU cores


def _real_image(data_dir: Path | None) -> tuple[np.ndarray, str]:
    """A real frontal chest film as float [0, 1], or a synthetic stand-in."""
    root = data_dir or Path(os.environ.get("CXR_SHARED_DATA", DEFAULT_DATA))
    folder = root / "nih_cxr14_fullres" / "images"
    if folder.is_dir():
        files = sorted(folder.glob("*.png"))
        if files:
            img = Image.open(files[0]).convert("L")
            return np.asarray(img, dtype=np.float32) / 255.0, f"{files[0].name} (real)"
    yy, xx = np.mgrid[0:1024, 0:1024].astype(np.float32) / 1024.0
    lungs = np.exp(-(((xx - 0.32) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + np.exp(
        -(((xx - 0.68) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2)
    )
    synthetic = np.clip(0.85 - 0.6 * lungs + 0.05 * np.sin(40 * yy), 0.0, 1.0)
    return synthetic.astype(np.float32), "synthetic"


def _png(pixels: np.ndarray, size: tuple[int, int]) -> bytes:
    img = Image.fromarray((pixels * 255).astype(np.uint8), mode="L").resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _dicom(pixels: np.ndarray, size: tuple[int, int], bits: int = 12) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    width, height = size
    img = Image.fromarray(pixels.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    values = np.round(np.clip(np.asarray(img), 0, 1) * ((1 << bits) - 1)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = values.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def bench_inputs(data_dir: Path | None = None) -> tuple[list[tuple[str, str, bytes]], str]:
    pixels, source = _real_image(data_dir)
    return [
        ("small PNG 256x256", "x.png", _png(pixels, (256, 256))),
        ("PNG 1024x1024", "x.png", _png(pixels, (1024, 1024))),
        ("DICOM 2500x2000 16-bit", "x.dcm", _dicom(pixels, (2500, 2000))),
    ], source


def _time(fn: Callable[[], object], iterations: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 95))


def run_bench(settings: Settings, *, iterations: int = 20, data_dir: Path | None = None) -> int:
    import torch

    from fhir_server.app import load_analyzer
    from fhir_server.inference import torch_threads_per_worker
    from ml.errors import CXRError

    threads = torch_threads_per_worker(settings.inference_workers)
    torch.set_num_threads(threads)
    try:
        analyzer = load_analyzer(settings.model_copy(update={"heatmap_top_k": 1}))
    except CXRError as exc:
        print(f"error: {exc.message}")
        return 2
    info = analyzer.model_info
    inputs, source = bench_inputs(data_dir)
    print(f"model {info.name} ({info.version}){' UNTRAINED' if info.untrained else ''}; "
          f"OOD gate {'on' if analyzer.has_ood_gate else 'off'}; torch threads {threads}; "
          f"image source {source}; {iterations} iterations; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"{'input':<24} {'bytes':>10}  {'heatmaps':<10} {'p50 ms':>8} {'p95 ms':>8}  detected")
    status = 0
    for name, filename, data in inputs:
        for label, heatmaps in (("no heatmap", False), ("1 heatmap", True)):
            try:
                result = analyzer.analyze_bytes(data, heatmaps=heatmaps, filename=filename)
                p50, p95 = _time(lambda: analyzer.analyze_bytes(data, heatmaps=heatmaps, filename=filename), iterations)
            except CXRError as exc:
                print(f"{name:<24} {len(data):>10}  {label:<10} refused: {exc.code}: {exc.message}")
                status = 1
                continue
            detected = sum(f.detected for f in result.findings)
            flag = ""
            if name.startswith("DICOM") and p50 > TARGET_P50_MS[label]:
                flag = f"  (target p50 <= {TARGET_P50_MS[label]:.0f} ms missed)"
            print(f"{name:<24} {len(data):>10}  {label:<10} {p50:8.1f} {p95:8.1f}  {detected}{flag}")
    return status
