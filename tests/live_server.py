"""The real server over real HTTP, for tools that need a URL (pyfhircheck, fhirpy, fhir-kit-client).

`run_live_server(app)` serves an app with uvicorn on 127.0.0.1 on a free port in a background
thread (lifespan included: model pool, database) and stops it afterwards. `live_server` is a
module-scoped fixture: a fresh temp CXR_DATA_DIR (SQLite), no auth, and the tiny hand-wired test
model injected (tests/model_fixtures.py); without it, the registry's `cxr:untrained-demo`.

Use it in a test module with `from live_server import live_server  # noqa: F401`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class LiveServer:
    root: str  # http://127.0.0.1:PORT
    app: Any

    @property
    def fhir_base(self) -> str:
        return f"{self.root}/fhir"


@contextmanager
def run_live_server(app: Any, *, startup_timeout: float = 60.0) -> Iterator[LiveServer]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; no race between choosing and binding
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            access_log=False)
    server = uvicorn.Server(config)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting test below
            errors.append(exc)

    thread = threading.Thread(target=serve, name=f"live-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if errors or not thread.is_alive():
            sock.close()
            raise RuntimeError(f"live server failed to start: {errors[0] if errors else 'thread exited'}")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"live server did not start within {startup_timeout} s")
        time.sleep(0.02)
    try:
        yield LiveServer(root=f"http://127.0.0.1:{port}", app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def make_test_app(data_dir: Path, *, analyzer: Any = None, **overrides: Any) -> Any:
    """create_app with test settings: temp SQLite data dir, no auth, no OOD gate, tiny model."""
    from fhir_server.app import create_app
    from fhir_server.settings import Settings

    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": None,
        "auth_enabled": False,
        "ood_gate": False,
        "model": "cxr:untrained-demo",
        "base_url": None,
        "fetch_allowed_hosts": [],
        **overrides,
    }
    return create_app(Settings(**values), analyzer=analyzer)


def tiny_test_analyzer() -> Any:
    """The tiny hand-wired model of tests/model_fixtures.py, or None (the server then loads
    cxr:untrained-demo from the registry)."""
    try:
        from model_fixtures import tiny_analyzer
    except ImportError:
        return None
    return tiny_analyzer()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    analyzer = tiny_test_analyzer()
    app = make_test_app(tmp_path_factory.mktemp("cxr-live-data"), analyzer=analyzer)
    try:
        with run_live_server(app) as server:
            yield server
    finally:
        if analyzer is not None:
            analyzer.close()
