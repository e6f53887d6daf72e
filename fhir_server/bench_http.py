"""`cxr bench --http`: the real server over real HTTP, against a naive Flask baseline.

For each model: start `cxr serve` (uvicorn) in a child process on 127.0.0.1 and a free port, then
- single-client p50/p95 of POST /api/v1/predict for a small PNG, a 1024 px PNG and a 2500x2000
  16-bit DICOM, without and with one heatmap;
- throughput (analyses/s) at 1, 4 and 8 concurrent clients posting the 1024 px PNG;
- then, in a phase of its own, p99 of GET /healthz and of a FHIR read (GET /fhir/Patient/{id}) while
  8 clients saturate it (the probes' own CPU would otherwise lower the 8-client throughput);
- the child's peak RSS (VmHWM), and every 5xx counted (503 server_busy included).
Then the naive baseline (fhir_server/bench_naive.py: Flask + TorchXRayVision DenseNet-121) is run
the same way, never at the same time as ours, and our throughput / its throughput is printed.

Every phase is bounded by a request count and a time limit, so a run takes a few minutes at most.
TorchXRayVision weights that are not installed are replaced by a random-weight fixture saved under
the exact file name torchxrayvision expects (the forward pass does not depend on the weights' values;
the head is scaled so that a film detects 1-2 findings, see xrv_weights_dir).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

XRV_DENSENET = "xrv:densenet121-res224-all"
CLIENTS = (1, 4, 8)


@dataclass
class ModelResult:
    label: str
    engine: str = "torch fp32"  # what /readyz says actually serves (an ONNX export can fall back to torch)
    latency: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # (input, hm) -> p50, p95
    throughput: dict[int, float] = field(default_factory=dict)
    errors_5xx: int = 0
    health_p99: float | None = None
    fhir_read_p99: float | None = None
    peak_rss_mb: float | None = None
    detected: int | None = None  # findings detected on the 1024 px film (each one costs a CAM + regions)
    # (analyses whose gate compared the film with its 4 turned / inverted copies, all analyses), from /metrics
    compared: tuple[int, int] | None = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_mb(pid: int, field: str = "VmHWM") -> float | None:
    """A memory field of /proc/<pid>/status in MB (VmHWM: peak resident; VmRSS: resident now)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def xrv_weights_dir(weights_dir: Path, scratch: Path) -> tuple[Path, bool]:
    """(a folder with DenseNet-121 'all' installed for our server AND as a pickle for the naive one,
    whether it is the random-weight fixture). Installed real weights (`cxr models pull`) are used on
    both sides: the naive server gets the same tensors re-saved as the pickle torchxrayvision loads."""
    import torch

    from ml.weights.catalog import load_catalog
    from ml.weights.store import install_fixture, load_installed

    entry = load_catalog().get(XRV_DENSENET)
    folder = scratch / "xrv-weights"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        net, manifest = load_installed(entry, Path(weights_dir).expanduser())
    except FileNotFoundError:
        manifest = None
    import torchxrayvision as xrv

    def naive_pickle(state) -> None:  # exactly what xrv.models.DenseNet(weights=...) unpickles
        plain = xrv.models.DenseNet(weights=None)
        plain.load_state_dict(state)
        torch.save(plain, folder / entry.file)

    if manifest is not None:  # installed weights (a real pull, or a fixture from an earlier run)
        naive_pickle({k: v for k, v in net.state_dict().items() if k != "op_threshs"})
        return Path(weights_dir).expanduser(), manifest.sha256_source == "fixture"
    torch.manual_seed(0)
    net = xrv.models.DenseNet(weights=None).eval()
    realistic_head(net)
    install_fixture(entry.name, net.state_dict(), folder)
    naive_pickle(net.state_dict())
    return folder, True


def realistic_head(net) -> None:
    """Make a random-weight xrv DenseNet detect about as many findings as the released weights do.

    Every detected finding costs a CAM and its regions, so the count matters for timing. The
    released 'all' weights put about half of the 18 outputs over their operating point on an
    ordinary NIH film (9 of 18 on 00000001_000.png, torchxrayvision issue 160); the old fixture's
    bias of -5 detected 1-2, which made `cxr bench` cheaper than what a user sees. Here each bias
    sits at the logit of its operating point minus the mean logit on the check images, so outputs
    straddle the operating points as real ones do."""
    import torch
    import torchxrayvision as xrv

    from ml.engine import check_images

    with torch.no_grad():
        net.classifier.weight.mul_(0.02)  # random features are large: keep outputs off 0/1
        mean_logit = net.classifier(net.features2(torch.from_numpy(check_images(224, 4)))).mean(0)
        op = torch.tensor(xrv.models.model_urls["densenet121-res224-all"]["op_threshs"])
        net.classifier.bias.add_(torch.logit(op) - mean_logit)


def fixture_members(models: list[str], folder: Path) -> list[str]:
    """Install random-weight fixtures in the bench's fixture folder for every other TorchXRayVision
    model named in `models` (ensemble members included); returns the names installed."""
    import torch
    import torchxrayvision as xrv

    from ml.weights.catalog import load_catalog
    from ml.weights.store import install_fixture, read_manifest

    catalog = load_catalog()
    names = {m for item in models for m in item.removeprefix("ensemble:").split(",") if m.startswith("xrv:")}
    done = []
    for i, name in enumerate(sorted(names)):
        entry = catalog.get(name)
        if read_manifest(folder, entry.name) is not None or entry.architecture != "densenet121":
            continue
        torch.manual_seed(100 + i)
        net = xrv.models.DenseNet(weights=None).eval()
        realistic_head(net)
        install_fixture(entry.name, net.state_dict(), folder)
        done.append(name)
    return done


@contextlib.contextmanager
def _server(cmd: list[str], env: dict[str, str], port: int, ready_path: str, log: Path) -> Iterator[subprocess.Popen]:
    import httpx

    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready after 300 s; see {log}")
                time.sleep(0.3)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _post(client, url: str, filename: str, data: bytes) -> int:
    return client.post(url, files={"image": (filename, data, "application/octet-stream")}).status_code


def _latency(url: str, filename: str, data: bytes, n: int, limit_s: float) -> tuple[float, float, int]:
    import httpx

    samples: list[float] = []
    errors = 0
    with httpx.Client(timeout=120) as client:
        for _ in range(2):
            _post(client, url, filename, data)  # warm-up
        stop = time.monotonic() + limit_s
        while len(samples) < n and time.monotonic() < stop:
            start = time.perf_counter()
            status = _post(client, url, filename, data)
            samples.append((time.perf_counter() - start) * 1000.0)
            errors += status >= 500
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 95)), errors


def _throughput(url: str, filename: str, data: bytes, clients: int, seconds: float,
                probes: list[tuple[str, list[float]]] | None = None) -> tuple[float, int]:
    """Analyses per second with `clients` concurrent loops for `seconds`; (rate, 5xx count)."""
    import httpx

    done = [0] * clients
    errors = [0] * clients
    start_at = time.monotonic() + 0.5  # every client starts together
    stop_at = start_at + seconds

    def loop(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < start_at:
                time.sleep(0.005)
            while time.monotonic() < stop_at:
                status = _post(client, url, filename, data)
                if status == 200:
                    done[i] += 1
                elif status >= 500:
                    errors[i] += 1

    def probe(probe_url: str, out: list[float]) -> None:
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < start_at + min(1.0, seconds / 4):  # let the pool fill up first
                time.sleep(0.01)
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                client.get(probe_url)
                out.append((time.perf_counter() - t0) * 1000.0)
                time.sleep(0.02)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    threads += [threading.Thread(target=probe, args=p) for p in probes or []]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start_at  # includes the requests still running at stop time
    return sum(done) / elapsed, sum(errors)


def _fhir_patient(root: str) -> str:
    import httpx

    r = httpx.post(f"{root}/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Bench"}]},
                   headers={"Content-Type": "application/fhir+json"}, timeout=30)
    r.raise_for_status()
    return f"{root}/fhir/Patient/{r.json()['id']}"


@contextlib.contextmanager
def our_server(model: str, weights_dir: Path, scratch: Path, extra_env: dict[str, str]
               ) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """`cxr serve` for `model` in a child process: (process, root URL, "engine precision" it serves with)."""
    import httpx

    port = _free_port()
    # "with one heatmap" means one: the server's top-k is set to 1 for the bench
    env = {**os.environ, "CXR_DATA_DIR": str(scratch / f"data-{port}"), "CXR_AUTH_ENABLED": "false",
           "CXR_HEATMAP_TOP_K": "1", **extra_env}
    cmd = [sys.executable, "-m", "fhir_server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", model, "--weights-dir", str(weights_dir), "--log-level", "warning"]
    root = f"http://127.0.0.1:{port}"
    with _server(cmd, env, port, "/readyz", scratch / f"ours-{port}.log") as proc:
        ready = httpx.get(f"{root}/readyz", timeout=10).json()
        yield proc, root, f"{ready.get('engine')} {ready.get('precision')}"


def bench_ours(model: str, weights_dir: Path, scratch: Path, inputs, *, iterations: int, seconds: float,
               extra_env: dict[str, str]) -> ModelResult:
    result = ModelResult(label=model)
    with our_server(model, weights_dir, scratch, extra_env) as (proc, root, engine):
        result.engine = engine
        url = f"{root}/api/v1/predict"
        for name, filename, data in inputs:
            for hm_label, query in (("no heatmap", ""), ("1 heatmap", "?heatmaps=true")):
                p50, p95, err = _latency(url + query, filename, data, iterations, limit_s=60)
                result.latency[(name, hm_label)] = (p50, p95)
                result.errors_5xx += err
        _, filename, data = inputs[1]
        result.detected = _detected(url, filename, data)
        _throughput_cells(result, url, filename, data, seconds)
        health: list[float] = []
        reads: list[float] = []
        _, err = _throughput(url, filename, data, max(CLIENTS), seconds,
                             [(f"{root}/healthz", health), (_fhir_patient(root), reads)])
        result.errors_5xx += err
        result.health_p99 = float(np.percentile(health, 99)) if health else None
        result.fhir_read_p99 = float(np.percentile(reads, 99)) if reads else None
        result.peak_rss_mb = memory_mb(proc.pid)
        result.compared = _orientation_comparisons(root)
    return result


def _orientation_comparisons(root: str) -> tuple[int, int] | None:
    """How many of the server's analyses ran the gate's orientation comparison (from /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{root}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    compared = total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cxr_gate_orientation_comparisons_total":
                compared += sample.value
            elif sample.name == "cxr_analyses_total":
                total += sample.value
    return int(compared), int(total)


def _weights_identity(folder: Path, fixture: bool) -> str:
    from ml.weights.store import read_manifest

    manifest = read_manifest(folder, "densenet121-res224-all")
    if manifest is None:
        return "none installed"
    kind = "random-weight fixture" if fixture else f"release file {manifest.release_file} ({manifest.sha256_source})"
    return f"{kind}, sha256 {manifest.sha256}"


def _detected(url: str, filename: str, data: bytes) -> int | None:
    import httpx

    r = httpx.post(url, files={"image": (filename, data, "application/octet-stream")}, timeout=120)
    if r.status_code != 200:
        return None
    return sum(bool(d.get("detected")) for d in r.json()["prediction"]["diagnoses"])


def _throughput_cells(result: ModelResult, url: str, filename: str, data: bytes, seconds: float) -> None:
    """Throughput at each client count with nothing else running: the probes of the saturation phase
    (50 health checks and 50 FHIR reads a second) take CPU too, so they get a phase of their own."""
    for clients in CLIENTS:
        rate, err = _throughput(url, filename, data, clients, seconds)
        result.throughput[clients] = rate
        result.errors_5xx += err


def bench_naive(weights_dir: Path, scratch: Path, inputs, *, iterations: int, seconds: float) -> ModelResult:
    port = _free_port()
    cmd = [sys.executable, "-m", "fhir_server.bench_naive", "--port", str(port), "--weights-dir", str(weights_dir)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    result = ModelResult(label="naive Flask + xrv DenseNet-121")
    url = f"http://127.0.0.1:{port}/predict"
    with _server(cmd, env, port, "/healthz", scratch / f"naive-{port}.log") as proc:
        for name, filename, data in inputs:
            if filename.endswith(".dcm"):
                continue  # PIL cannot read DICOM: the naive server has no DICOM support
            p50, p95, err = _latency(url, filename, data, iterations, limit_s=60)
            result.latency[(name, "no heatmap")] = (p50, p95)
            result.errors_5xx += err
        _, filename, data = inputs[1]
        _throughput_cells(result, url, filename, data, seconds)
        health: list[float] = []
        _, err = _throughput(url, filename, data, max(CLIENTS), seconds, [(f"http://127.0.0.1:{port}/healthz", health)])
        result.errors_5xx += err
        result.health_p99 = float(np.percentile(health, 99)) if health else None
        result.peak_rss_mb = memory_mb(proc.pid)
    return result


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_results(results: list[ModelResult], naive: ModelResult | None) -> None:
    everything = results + ([naive] if naive else [])
    for r in everything:
        print(f"\n== {r.label} ({r.engine})")
        print(f"   {'input':<24} {'heatmaps':<11} {'p50 ms':>8} {'p95 ms':>8}")
        for (name, hm), (p50, p95) in r.latency.items():
            print(f"   {name:<24} {hm:<11} {p50:8.1f} {p95:8.1f}")
        rates = "  ".join(f"{c} clients {r.throughput.get(c, 0):.2f}/s" for c in CLIENTS)
        print(f"   throughput (1024 px PNG, no heatmap): {rates}")
        if r.detected is not None:
            print(f"   findings detected on the 1024 px film: {r.detected} (regions are computed for each)")
        if r.compared is not None:
            print(f"   gate orientation comparisons (4 extra backbone passes each): {r.compared[0]} of {r.compared[1]} "
                  "analyses (a film whose orientation alone is not clear is compared with its turned copies)")
        print(f"   under 8-client saturation: /healthz p99 {_fmt(r.health_p99)} ms; FHIR read p99 "
              f"{_fmt(r.fhir_read_p99)} ms; 5xx responses {r.errors_5xx}; peak RSS {_fmt(r.peak_rss_mb, '.0f')} MB")
    if naive:
        print("\n== ours / naive throughput (same 1024 px PNG)")
        for r in results:
            ratios = "  ".join(
                f"{c} clients x{r.throughput[c] / naive.throughput[c]:.2f}" if naive.throughput.get(c) else f"{c} clients -"
                for c in CLIENTS
            )
            print(f"   {r.label:<32} {ratios}")


def run_http_bench(settings, *, models: list[str], iterations: int, seconds: float, data_dir: Path | None,
                   naive: bool = True, extra_env: dict[str, str] | None = None) -> int:
    import logging

    from fhir_server.bench import bench_inputs

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    inputs, source = bench_inputs(data_dir)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        scratch = Path(tmp)
        xrv_dir, fixture = xrv_weights_dir(settings.weights_dir, scratch)
        if fixture:
            fixture_members(models, xrv_dir)
        print(f"cxr bench --http: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; image source {source}; "
              f"{iterations} requests per latency cell; {seconds:.0f} s per throughput cell; engine "
              f"{(extra_env or {}).get('CXR_ENGINE', settings.engine)}"
              f"{'; xrv weights: RANDOM-WEIGHT FIXTURE (timings only)' if fixture else ''}")
        print(f"   xrv weights: {_weights_identity(xrv_dir, fixture)}; the naive server gets the same tensors")
        print(f"   ours: OOD gate {'on (its MobileNetV2 backbone runs per request too)' if settings.ood_gate else 'off'}, "
              f"lone batch on all cores {'on' if settings.lone_batch_all_cores else 'off'}; naive: Flask threaded, "
              "torch/OpenMP defaults as a user runs it, no gate, no regions")
        results: list[ModelResult] = []
        naive_result: ModelResult | None = None
        order: list[str] = []
        for model in models:  # ours and the naive server alternate, one at a time
            order.append(model)
            if naive and naive_result is None and len(order) == 1 and len(models) > 1:
                order.append("naive")
        if naive and "naive" not in order:
            order.append("naive")
        for item in order:
            if item == "naive":
                print("   running: naive baseline", flush=True)
                naive_result = bench_naive(scratch / "xrv-weights", scratch, inputs, iterations=iterations, seconds=seconds)
            else:
                print(f"   running: {item}", flush=True)
                wdir = xrv_dir if "xrv:" in item else Path(settings.weights_dir)
                results.append(bench_ours(item, wdir, scratch, inputs, iterations=iterations, seconds=seconds,
                                          extra_env=extra_env or {}))
        print_results(results, naive_result)
        print(f"\nload average at the end {os.getloadavg()[0]:.1f} (figures from a machine with other load are "
              "not comparable: rerun on a quiet one)")
        bad = sum(r.errors_5xx for r in results)
    return 1 if bad else 0
