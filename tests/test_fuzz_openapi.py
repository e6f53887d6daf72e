"""Schemathesis over openapi/openapi.json against the in-process app (issue 10: zero 5xx on any
input). Every operation gets generated requests, valid and invalid (positive and negative
phases), sent through Starlette's TestClient to the real app: the tiny model, SQLite in a temp
dir, the audit trail on. Bounded and deterministic for CI: derandomized Hypothesis, a fixed
number of examples per operation, no deadline (2 shared cores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core import NOT_SET

from analyze_support import make_client

pytestmark = pytest.mark.fuzz

SPEC = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
schema = schemathesis.openapi.from_path(SPEC)


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    with make_client(tmp_path_factory.mktemp("fuzz"), raise_server_exceptions=False) as client:
        yield client


@schema.parametrize()
@settings(max_examples=25, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_5xx(case, app_client):
    response = app_client.request(**_request(case))
    # 503 is the server's documented answer to load (queue full, store down), never a crash
    assert response.status_code < 500 or response.status_code == 503, (
        case.method, case.formatted_path, response.status_code, response.text[:500])


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else json.dumps(value)).encode("utf-8", "surrogatepass")


def _request(case: Any) -> dict[str, Any]:
    """The generated case as TestClient arguments (schemathesis' own ASGI transport would run
    the app on another event loop than the one its lifespan started the inference pool on)."""
    headers = {str(k): str(v) for k, v in (case.headers or {}).items()}
    request: dict[str, Any] = {"method": case.method, "url": case.formatted_path, "headers": headers,
                               "params": case.query or None}
    if case.cookies:
        app_client_cookie = "; ".join(f"{k}={v}" for k, v in case.cookies.items())
        headers["cookie"] = app_client_cookie
    body, media = case.body, case.media_type
    if body is NOT_SET or body is None and media is None:
        return request
    if media and media.startswith("multipart/"):
        parts = body.items() if isinstance(body, dict) else [("image", body)]
        request["files"] = [(str(k), ("upload", _bytes(v), "application/octet-stream")) for k, v in parts]
        headers.pop("content-type", None)
        headers.pop("Content-Type", None)
    elif media == "application/x-www-form-urlencoded" and isinstance(body, dict):
        request["data"] = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}
    else:
        request["content"] = _bytes(body) if not (media or "").endswith("json") else json.dumps(body).encode("utf-8", "surrogatepass")
        headers.setdefault("Content-Type", media or "application/octet-stream")
    return request
