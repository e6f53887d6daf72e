"""Shared set-up for the $analyze tests: an app with the tiny model, SQLite in tmp, respx-safe DNS."""

from __future__ import annotations

import base64
import time
from typing import Any

from model_fixtures import png_bytes, quadrant_pixels, tiny_analyzer

HOST = "pacs.example.test"


async def fake_resolve(host: str) -> list[str]:
    """Tests never touch real DNS: the PACS host 'resolves' to a public documentation address."""
    return ["93.184.216.34"] if host == HOST else []


def make_client(tmp_path, *, analyzer: Any = None, raise_server_exceptions: bool = True, **overrides: Any):
    from fastapi.testclient import TestClient

    from fhir_server.app import create_app
    from fhir_server.settings import Settings

    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "database_url": None,
        "auth_enabled": False,
        "ood_gate": False,
        "base_url": None,
        "fetch_allowed_hosts": [HOST],
        "fetch_timeout_s": 5.0,
        **overrides,
    }
    app = create_app(Settings(**values), analyzer=analyzer or tiny_analyzer())
    app.state.fetch_policy_overrides = {"resolver": fake_resolve}
    return TestClient(app, raise_server_exceptions=raise_server_exceptions)


def png_b64(quadrant: str | None = "top_left") -> str:
    return base64.b64encode(png_bytes(quadrant_pixels(96, 96, quadrant=quadrant))).decode()


def media(data: str | None = None, **extra: Any) -> dict:
    resource = {
        "resourceType": "Media",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "createdDateTime": "2024-05-01T10:00:00Z",
        "content": {"contentType": "image/png", "data": data or png_b64()},
    }
    resource.update(extra)
    return resource


def by_type(bundle: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for entry in bundle["entry"]:
        out.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    return out


def total(client, query: str) -> int:
    response = client.get(f"/fhir/{query}")
    assert response.status_code == 200, response.text
    return response.json()["total"]


def outcome(response) -> dict:
    assert response.headers["content-type"].startswith("application/fhir+json"), response.headers
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")
