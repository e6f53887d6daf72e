"""`cxr bench --replicas N`: throughput of 1..N `cxr serve` processes behind a real nginx.

Each step starts k replicas (k = 1..N) on free loopback ports, sharing one database (CXR_DATABASE_URL
when set, else one SQLite file), each with cores // k inference workers, and an nginx on another
loopback port that balances them (least_conn, keep-alive upstream connections, the same proxy
settings as deploy/nginx). It then measures analyses/s of the 1024 px PNG at 1, 4 and 8 clients
through nginx, plus one process without nginx for the proxy's own cost, and how the requests were
spread (each replica's /metrics). Bounded: every cell is `seconds` long; everything it started is
stopped at the end. Needs the `nginx` binary (Debian package nginx).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fhir_server.bench_http import CLIENTS, _free_port, _server, _throughput

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 64m;
    client_body_buffer_size 64m;
    upstream cxr {{
        least_conn;
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://cxr;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 300s;
            proxy_request_buffering on;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


@contextlib.contextmanager
def nginx(upstreams: list[int], scratch: Path) -> Iterator[str]:
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx)")
    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="nginx-", dir=scratch))
    tmp.chmod(0o755)  # nginx's worker drops root to `nobody` and must read/write here
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in upstreams)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, servers=servers))
    with _server([binary, "-p", str(tmp), "-c", str(conf)], dict(os.environ), port, "/healthz", tmp / "nginx.log") as proc:
        yield f"http://127.0.0.1:{port}"
    del proc


@contextlib.contextmanager
def replicas(k: int, model: str, scratch: Path, extra_env: dict[str, str]) -> Iterator[list[tuple[int, str]]]:
    from fhir_server.inference import available_cores

    ports = [_free_port() for _ in range(k)]
    data = scratch / "shared-data"  # one database for all replicas, as in a deployment
    workers = max(1, available_cores() // k)
    env = {**os.environ, "CXR_DATA_DIR": str(data), "CXR_AUTH_ENABLED": "false", "CXR_HEATMAP_TOP_K": "1",
           "CXR_INFERENCE_WORKERS": str(workers), **extra_env}
    with contextlib.ExitStack() as stack:
        started = []
        for port in ports:
            cmd = [sys.executable, "-m", "fhir_server", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--model", model, "--log-level", "warning"]
            stack.enter_context(_server(cmd, env, port, "/readyz", scratch / f"replica-{port}.log"))
            started.append((port, f"http://127.0.0.1:{port}"))
        yield started


def served_by(root: str) -> float:
    """Analyses this replica served, from its own /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{root}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "cxr_analyses_total" and s.labels.get("outcome") == "served")


def run_replicas_bench(settings, *, max_replicas: int, seconds: float, data_dir: Path | None,
                       extra_env: dict[str, str] | None = None) -> int:
    import logging

    from fhir_server.bench import bench_inputs
    from fhir_server.inference import available_cores

    logging.getLogger("httpx").setLevel(logging.WARNING)
    inputs, source = bench_inputs(data_dir)
    _, filename, data = inputs[1]  # the 1024 px PNG
    model = settings.model
    print(f"cxr bench --replicas {max_replicas}: {available_cores()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"model {model}; image {source}; {seconds:.0f} s per cell; 1024 px PNG to /api/v1/predict")
    rows: list[tuple[str, dict[int, float], int, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="cxr-bench-replicas-") as tmp:
        scratch = Path(tmp)
        with replicas(1, model, scratch, extra_env or {}) as started:
            rates, errors = {}, 0
            for clients in CLIENTS:
                rates[clients], err = _throughput(f"{started[0][1]}/api/v1/predict", filename, data, clients, seconds)
                errors += err
            rows.append(("1 process, direct", rates, errors, []))
        for k in range(1, max_replicas + 1):
            with replicas(k, model, scratch, extra_env or {}) as started, nginx([p for p, _ in started], scratch) as root:
                before = [served_by(r) for _, r in started]
                rates, errors = {}, 0
                for clients in CLIENTS:
                    rates[clients], err = _throughput(f"{root}/api/v1/predict", filename, data, clients, seconds)
                    errors += err
                spread = [served_by(r) - b for (_, r), b in zip(started, before, strict=True)]
                rows.append((f"{k} process{'es' if k > 1 else ''} behind nginx", rates, errors, spread))
            time.sleep(0.5)
    print(f"\n   {'setup':<28} " + " ".join(f"{c:>2} clients" for c in CLIENTS) + "   5xx  analyses per replica")
    for label, rates, errors, spread in rows:
        cells = " ".join(f"{rates[c]:8.2f}/s" for c in CLIENTS)
        print(f"   {label:<28} {cells}   {errors:>3}  {' '.join(f'{int(s)}' for s in spread) or '-'}")
    return 1 if any(r[2] for r in rows) else 0
