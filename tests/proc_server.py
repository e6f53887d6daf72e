"""Real `cxr serve` / `cxr worker` processes for crash tests: spawned with `python -m fhir_server`
on a free 127.0.0.1 port, so a test can SIGKILL one and start it again on the same database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """A fast, small real server: the registry's untrained demo model (real code path, accepts synthetic images) on torch (no ONNX export at start), no OOD gate."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update({
        "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CXR_DATA_DIR": str(data_dir),
        "CXR_MODEL": "cxr:untrained-demo", "CXR_ENGINE": "torch", "CXR_OOD_GATE": "false",
        "CXR_AUTH_ENABLED": "false", "CXR_INFERENCE_WORKERS": "1",
    })
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` s (cxr serve / worker, Orthanc, any server a test started)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.port = port
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "fhir_server", *args], env=env, cwd=ROOT,
            stdout=self._log_file, stderr=subprocess.STDOUT,
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"server exited with {self.popen.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)
        self._log_file.close()

    def stop(self, timeout: float = 20.0) -> int | None:
        stop_process(self.popen, timeout)
        self._log_file.close()
        return self.popen.returncode


def start_serve(env: dict[str, str], log: Path) -> Proc:
    port = free_port()
    return Proc(["serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], env, log, port)


@contextmanager
def processes() -> Iterator[list[Proc]]:
    """Every process a test starts is stopped at the end, whatever happened."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(10)
            if not proc._log_file.closed:
                proc._log_file.close()
