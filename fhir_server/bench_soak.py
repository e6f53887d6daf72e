"""`cxr bench --soak N`: does the server's memory stay flat over thousands of requests?

Starts `cxr serve` in a child process on 127.0.0.1 (as `cxr bench --http` does) and sends N requests
from a few concurrent clients, cycling through the traffic a hospital sends: legacy predictions of a
small PNG, a 1024 px PNG with heatmaps and a 16-bit DICOM; FHIR `Media/$analyze` with inline data
(which stores a report, observations and heatmap Binaries); FHIR reads; and a refused non-image.
The child's resident memory (VmRSS) is sampled every N/20 requests. Printed: the samples, the growth
from the end of warm-up (the first 20%: caches, lazy imports, allocator arenas) to the end, and the
least-squares slope over the rest in MB per 1000 requests. Every 5xx and every answer other than
the one expected for its request type is counted; either makes the command exit 1.
"""

from __future__ import annotations

import base64
import itertools
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fhir_server.bench_http import memory_mb, our_server, xrv_weights_dir

SAMPLES = 20
WARMUP_SHARE = 0.2
CLIENTS = 4


@dataclass
class SoakResult:
    model: str
    engine: str
    requests: int = 0
    errors_5xx: int = 0
    unexpected: list[str] = field(default_factory=list)  # "kind: status" of answers that were not expected
    rss_mb: list[tuple[int, float]] = field(default_factory=list)  # (requests done, VmRSS MB)

    def growth_after_warmup(self) -> tuple[float, float] | None:
        """(MB grown from the end of warm-up to the end, slope in MB per 1000 requests after warm-up)."""
        after = [(n, mb) for n, mb in self.rss_mb if n >= WARMUP_SHARE * self.requests]
        if len(after) < 3:
            return None
        done, mb = np.array(after, dtype=np.float64).T
        slope = float(np.polyfit(done, mb, 1)[0]) * 1000.0
        return float(mb[-1] - mb[0]), slope


def _rss_mb(pid: int) -> float:
    mb = memory_mb(pid, "VmRSS")
    if mb is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return mb


def _traffic(root: str, patient: str, inputs) -> list[tuple[str, str, dict, int]]:
    """(kind, method+url, httpx keyword arguments, expected status) in the order they are cycled."""
    (_, _, small_png), (_, _, big_png), (_, _, dicom) = inputs
    predict = f"{root}/api/v1/predict"
    media = {
        "resourceType": "Media", "status": "completed", "subject": {"reference": patient},
        "content": {"contentType": "image/png", "data": base64.b64encode(small_png).decode()},
    }
    fhir = {"Content-Type": "application/fhir+json"}
    return [
        ("predict small PNG", f"POST {predict}", {"files": {"image": ("x.png", small_png)}}, 200),
        ("predict 1024 px PNG + heatmaps", f"POST {predict}?heatmaps=true", {"files": {"image": ("x.png", big_png)}}, 200),
        ("predict DICOM", f"POST {predict}", {"files": {"image": ("x.dcm", dicom)}}, 200),
        ("FHIR Media/$analyze", f"POST {root}/fhir/Media/$analyze", {"json": media, "headers": fhir}, 201),
        ("FHIR read", f"GET {root}/fhir/{patient}", {}, 200),
        ("refused non-image", f"POST {predict}", {"files": {"image": ("x.png", b"not an image" * 100)}}, 415),
    ]


def soak(root: str, pid: int, inputs, *, requests: int, clients: int = CLIENTS) -> SoakResult:
    """Send `requests` requests to the server at `root` (process `pid`) and sample its memory."""
    import httpx

    created = httpx.post(f"{root}/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Soak"}]},
                         headers={"Content-Type": "application/fhir+json"}, timeout=30)
    created.raise_for_status()
    traffic = _traffic(root, f"Patient/{created.json()['id']}", inputs)
    result = SoakResult(model="", engine="", requests=requests)
    counter = itertools.count()
    lock = threading.Lock()
    every = max(1, requests // SAMPLES)
    result.rss_mb.append((0, _rss_mb(pid)))

    def client_loop() -> None:
        with httpx.Client(timeout=120) as client:
            while (i := next(counter)) < requests:
                kind, target, kwargs, expected = traffic[i % len(traffic)]
                method, url = target.split(" ", 1)
                status = client.request(method, url, **kwargs).status_code
                with lock:
                    if status >= 500:
                        result.errors_5xx += 1
                    if status != expected:
                        result.unexpected.append(f"{kind}: {status}")
                    if (i + 1) % every == 0 or i + 1 == requests:
                        result.rss_mb.append((i + 1, _rss_mb(pid)))

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.rss_mb.sort()
    return result


def print_soak(result: SoakResult) -> None:
    print(f"\n== memory over {result.requests} requests: {result.model} ({result.engine}), {CLIENTS} clients")
    print("   requests  VmRSS MB")
    for done, mb in result.rss_mb:
        print(f"   {done:8d}  {mb:8.1f}")
    growth = result.growth_after_warmup()
    if growth is not None:
        print(f"   after warm-up ({WARMUP_SHARE:.0%} of the requests): {growth[0]:+.1f} MB to the end; "
              f"slope {growth[1]:+.2f} MB per 1000 requests")
    print(f"   5xx responses {result.errors_5xx}; unexpected answers {len(result.unexpected)}"
          + (f" (first: {result.unexpected[:3]})" if result.unexpected else ""))


def run_soak(settings, *, model: str, requests: int, data_dir: Path | None) -> int:
    import logging

    from fhir_server.bench import bench_inputs

    logging.getLogger("httpx").setLevel(logging.WARNING)
    inputs, source = bench_inputs(data_dir)
    with tempfile.TemporaryDirectory(prefix="cxr-soak-") as tmp:
        scratch = Path(tmp)
        weights = xrv_weights_dir(settings.weights_dir, scratch)[0] if model.startswith("xrv:") else Path(settings.weights_dir)
        print(f"cxr bench --soak: {model}, {requests} requests, image source {source}", flush=True)
        with our_server(model, weights, scratch, {}) as (proc, root, engine):
            result = soak(root, proc.pid, inputs, requests=requests)
        result.model, result.engine = model, engine
    print_soak(result)
    return 1 if result.errors_5xx or result.unexpected else 0
