"""No PHI in logs: a session of PHI-bearing requests, in process and through a real `cxr serve`;
request ids accepted, generated and echoed; the access log's fields."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from analyze_support import make_client, png_bytes, quadrant_pixels

from fhir_server.observability import sane_request_id
from fhir_server.observability.logs import JsonFormatter, RequestIdFilter, quiet_url_loggers

REPO = Path(__file__).resolve().parent.parent
PHI = ("Zzyzx", "Quentina", "MRN-98765", "1961-07-14", "555-0199")
PATIENT = {
    "resourceType": "Patient",
    "name": [{"family": "Zzyzx", "given": ["Quentina"]}],
    "birthDate": "1961-07-14",
    "identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN-98765"}],
    "telecom": [{"system": "phone", "value": "555-0199"}],
}


def phi_session(request) -> list[int]:
    """Send PHI in bodies, queries, headers and file names; returns the statuses (all answered)."""
    statuses = []

    def go(method, url, **kwargs):
        r = request(method, url, **kwargs)
        statuses.append(r.status_code)
        return r

    created = go("POST", "/fhir/Patient", json=PATIENT)
    pid = created.json().get("id", "x")
    go("GET", "/fhir/Patient?family=Zzyzx&identifier=MRN-98765")
    go("GET", "/fhir/Patient?birthdate=1961-07-14&name=Quentina&telecom=555-0199")
    go("GET", "/fhir/Patient?family:exact=Zzyzx&_sort=Zzyzx")  # refused search: the value is in the query
    go("GET", "/fhir/Patient?birthdate=Zzyzx-MRN-98765")  # 400 whose message could echo the value
    go("POST", "/fhir/Patient", json={**PATIENT, "birthDate": "Zzyzx 1961-07-14"})  # 400 invalid body
    go("PUT", f"/fhir/Patient/{pid}", json={**PATIENT, "id": pid, "gender": "Zzyzx"})  # bad code
    go("POST", "/fhir/Patient/_search", data={"family": "Zzyzx", "identifier": "MRN-98765"})
    go("GET", "/fhir/Patient", headers={"X-Patient-Name": "Zzyzx", "X-Request-ID": "abc-123-def"})
    png = png_bytes(quadrant_pixels(96, 96, quadrant="top_left"))
    media = {"resourceType": "Media", "status": "completed", "subject": {"display": "Zzyzx Quentina"},
             "content": {"contentType": "image/png", "data": base64.b64encode(png).decode(), "title": "MRN-98765.png"}}
    go("POST", "/fhir/Media/$analyze", json=media)
    go("POST", "/api/v1/predict", files={"image": ("Zzyzx_MRN-98765_1961-07-14.png", b"not an image", "image/png")})
    go("POST", "/api/v1/predict?patient=Zzyzx", files={"image": ("Zzyzx_MRN-98765.png", png, "image/png")})
    return statuses


def assert_no_phi(text: str) -> None:
    for value in PHI:
        assert value not in text, f"{value!r} leaked into the log"


@pytest.fixture
def captured():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    quiet_url_loggers()  # as `cxr serve` does (the test client's own httpx lines would show the queries sent)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_phi_session_in_process_leaves_no_phi_in_logs(tmp_path, captured):
    with make_client(tmp_path, raise_server_exceptions=False) as c:
        statuses = phi_session(c.request)
    assert all(s < 500 for s in statuses), statuses
    text = captured.getvalue()
    assert_no_phi(text)
    access = [json.loads(line) for line in text.splitlines() if '"logger": "cxr.access"' in line]
    assert len(access) == len(statuses)
    search = next(a for a in access if a["method"] == "GET" and a["path"] == "/fhir/Patient")
    assert set(search) >= {"ts", "level", "msg", "method", "path", "status", "duration_ms", "client_id", "request_id"}
    assert all("?" not in a["path"] and "?" not in a["msg"] for a in access)
    assert any(a["request_id"] == "abc-123-def" for a in access)


def test_request_id_is_echoed_generated_or_replaced(tmp_path):
    with make_client(tmp_path) as c:
        assert c.get("/healthz", headers={"X-Request-ID": "req-42.a:b_c"}).headers["x-request-id"] == "req-42.a:b_c"
        generated = c.get("/fhir/Patient").headers["x-request-id"]
        assert len(generated) == 32 and int(generated, 16) >= 0
        for insane in ("has spaces", "x" * 200, "<script>", "Zzyzx\u00e9".encode()):
            echoed = c.get("/fhir/Patient", headers={"X-Request-ID": insane}).headers["x-request-id"]
            assert echoed != insane and len(echoed) == 32
        assert c.get("/fhir/Nope/1").headers["x-request-id"]  # errors carry it too
        assert c.get("/no/such/route").headers["x-request-id"]
    assert sane_request_id("abc") == "abc" and sane_request_id("-abc") != "-abc"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cxr_serve_subprocess_logs_json_without_phi(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "CXR_DATA_DIR": str(tmp_path),
        "CXR_MODEL": "no-such:model",  # a model that fails to load: the server serves FHIR without it, fast
        "CXR_AUTH_ENABLED": "false",
        "CXR_DATABASE_URL": "",
    }
    env.pop("CXR_DATABASE_URL")
    stderr_path = tmp_path / "server.log"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fhir_server", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=stderr, stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, "cxr serve did not start"
            time.sleep(0.5)
        with httpx.Client(base_url=base, timeout=60) as http:
            statuses = phi_session(http.request)
        assert all(s < 500 or s == 503 for s in statuses), statuses  # 503: no model for $analyze / predict
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = stderr_path.read_text()
    assert_no_phi(text)
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert lines and len(lines) == len([line for line in text.splitlines() if line.strip()]), text  # all JSON
    access = [entry for entry in lines if entry["logger"] == "cxr.access"]
    assert len(access) >= len(statuses)
    assert not any(entry["logger"] == "uvicorn.access" for entry in lines)
    assert any(entry["path"] == "/fhir/Patient" and entry["method"] == "GET" and entry["status"] == 200 for entry in access)


def test_unhandled_error_is_answered_with_the_request_id(tmp_path, caplog):
    with make_client(tmp_path, raise_server_exceptions=False) as c:

        @c.app.get("/api/v1/boom")
        async def boom() -> dict:
            raise RuntimeError("secret Zzyzx detail")

        with caplog.at_level(logging.INFO):
            r = c.get("/api/v1/boom?family=Zzyzx", headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-500"
    assert r.json()["status"] == "error" and "Zzyzx" not in r.text
    access = [rec for rec in caplog.records if rec.name == "cxr.access"]
    assert [(a.path, a.status, a.request_id) for a in access] == [("/api/v1/boom", 500, "req-500")]
