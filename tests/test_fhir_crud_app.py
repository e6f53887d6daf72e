"""The FHIR API wired into the real application (create_app): lifespan creates the store from
settings, data survives a restart, and the auth boundary leaves health probes open."""

from __future__ import annotations

from fastapi.testclient import TestClient

from fhir_server.app import create_app
from fhir_server.settings import Settings


class _NoModel:
    """The FHIR CRUD routes never touch the analyzer; injecting one skips loading model weights."""

    ready = False


def test_lifespan_store_persists_across_restarts(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", database_url=None)
    with TestClient(create_app(settings, analyzer=_NoModel())) as c:
        r = c.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "other"})
        assert r.status_code == 201
        pid = r.json()["id"]
        assert c.get("/fhir/metadata").json()["resourceType"] == "CapabilityStatement"
    assert (tmp_path / "data" / "cxr.sqlite3").exists()
    with TestClient(create_app(settings, analyzer=_NoModel())) as c:
        assert c.get(f"/fhir/Patient/{pid}").json()["gender"] == "other"
        r = c.get("/fhir/NoSuchType/1")
        assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"


def test_auth_enabled_app_keeps_probes_open(tmp_path):
    settings = Settings(data_dir=tmp_path, auth_enabled=True, auth_dev_static_tokens=True,
                        auth_tokens={"secret": "system/*.cruds"})
    with TestClient(create_app(settings, analyzer=_NoModel())) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/fhir/metadata").status_code == 200
        assert c.get("/.well-known/smart-configuration").status_code == 200
        r = c.get("/fhir/Patient")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        legacy = c.post("/api/v1/predict", files={"file": ("x.png", b"not an image", "image/png")})
        assert legacy.status_code == 401 and legacy.json()["status"] == "error"  # legacy JSON, same boundary
        assert legacy.headers["www-authenticate"].startswith("Bearer")
        authed = c.post("/api/v1/predict", files={"file": ("x.png", b"not an image", "image/png")}, headers={"Authorization": "Bearer secret"})
        assert authed.status_code not in (401, 403)
        ok = c.get("/fhir/Patient", headers={"Authorization": "Bearer secret", "Origin": "https://ehr.example"})
        assert ok.status_code == 200
        assert "etag" in ok.headers["access-control-expose-headers"].lower()
