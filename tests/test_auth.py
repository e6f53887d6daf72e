"""The authentication boundary: bearer tokens with SMART v1/v2 scopes, 401/403, open paths, CORS."""

from __future__ import annotations

import pytest
from fastapi import Depends
from fastapi.testclient import TestClient
from fhir_support import make_app, outcome_of

from fhir_server.auth import parse_scope, principal_for, require_auth, required_permissions
from fhir_server.storage import Repository

TOKENS = {
    "reader": "system/*.read",
    "v2reader": "system/DiagnosticReport.rs system/Observation.r",
    "writer": "system/Patient.cruds",
    "v1writer": "system/*.write system/*.read",
    "patientscope": "patient/*.read",
    "conditional": "system/Observation.rs?category=imaging",
    "analyst": "system/Media.r system/DiagnosticReport.c",
}


@pytest.fixture
def secured(tmp_path):
    store = Repository.from_url(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    app = make_app(store, auth_enabled=True, auth_dev_static_tokens=True, auth_tokens=TOKENS)

    @app.get("/api/v1/ping", dependencies=[Depends(require_auth)])
    async def ping() -> dict:
        return {"pong": True}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    with TestClient(app) as c:
        yield c
    store.dispose()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_missing_or_bad_token_is_401_with_challenge(secured):
    r = secured.get("/fhir/Patient")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert outcome_of(r)["issue"][0]["code"] == "login"
    r = secured.get("/fhir/Patient", headers=bearer("nope"))
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    r = secured.get("/fhir/Patient", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert r.status_code == 401
    # outside /fhir the error is the legacy JSON, not an OperationOutcome
    r = secured.get("/api/v1/ping")
    assert r.status_code == 401 and r.json()["status"] == "error" and r.headers["www-authenticate"].startswith("Bearer")
    assert secured.get("/api/v1/ping", headers=bearer("reader")).json() == {"pong": True}


def test_open_paths(secured):
    assert secured.get("/fhir/metadata").status_code == 200
    assert secured.get("/.well-known/smart-configuration").status_code == 200
    assert secured.get("/healthz").status_code == 200


def test_scopes_decide_interactions(secured):
    r = secured.get("/fhir/Patient", headers=bearer("reader"))
    assert r.status_code == 200
    r = secured.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=bearer("reader"))
    assert r.status_code == 403 and outcome_of(r)["issue"][0]["code"] == "forbidden"
    created = secured.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=bearer("writer"))
    assert created.status_code == 201
    pid = created.json()["id"]
    assert secured.get(f"/fhir/Patient/{pid}", headers=bearer("writer")).status_code == 200
    assert secured.delete(f"/fhir/Patient/{pid}", headers=bearer("reader")).status_code == 403
    assert secured.post("/fhir/Observation", json={"resourceType": "Observation"}, headers=bearer("writer")).status_code == 403
    # v2 .rs on one type
    assert secured.get("/fhir/DiagnosticReport", headers=bearer("v2reader")).status_code == 200
    assert secured.get("/fhir/Patient", headers=bearer("v2reader")).status_code == 403
    assert secured.get("/fhir/Observation", headers=bearer("v2reader")).status_code == 403  # r but not s
    assert secured.get("/fhir/Observation/x", headers=bearer("v2reader")).status_code == 404  # r allows read
    # v1 write
    assert secured.post("/fhir/Device", json={"resourceType": "Device"}, headers=bearer("v1writer")).status_code == 201
    # scopes this server cannot honour grant nothing
    assert secured.get("/fhir/Patient", headers=bearer("patientscope")).status_code == 403
    assert secured.get("/fhir/Observation", headers=bearer("conditional")).status_code == 403
    # system history needs a wildcard read
    assert secured.get("/fhir/_history", headers=bearer("v2reader")).status_code == 403
    assert secured.get("/fhir/_history", headers=bearer("reader")).status_code == 200
    # an operation reads its input and writes a report
    assert required_permissions("POST", "/fhir/Media/$analyze") == [("Media", "r"), ("DiagnosticReport", "c")]
    assert required_permissions("GET", "/fhir/CodeSystem/$lookup") == [("CodeSystem", "r")]  # reads only


def test_transaction_entries_are_authorized_one_by_one(secured):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Device"}, "request": {"method": "POST", "url": "Device"}},
        ],
    }
    r = secured.post("/fhir", json=bundle, headers=bearer("writer"))
    assert r.status_code == 403 and "Bundle.entry[1]" in outcome_of(r)["issue"][0]["diagnostics"]
    assert secured.get("/fhir/Patient?_summary=count", headers=bearer("reader")).json()["total"] == 0
    bundle["type"] = "batch"
    r = secured.post("/fhir", json=bundle, headers=bearer("writer"))
    assert [e["response"]["status"] for e in r.json()["entry"]] == ["201 Created", "403 Forbidden"]


def test_auth_disabled_lets_everything_through(tmp_path):
    store = Repository.from_url(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    with TestClient(make_app(store, auth_enabled=False, auth_tokens=TOKENS)) as c:
        assert c.post("/fhir/Patient", json={"resourceType": "Patient"}).status_code == 201
    store.dispose()


def test_cors_exposes_fhir_headers(secured):
    r = secured.options(
        "/fhir/Patient", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "https://app.example")
    r = secured.post("/fhir/Patient", json={"resourceType": "Patient"}, headers={**bearer("writer"), "Origin": "https://app.example"})
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"location", "etag", "content-location", "last-modified"} <= exposed


@pytest.mark.parametrize(
    ("scope", "rtype", "perms"),
    [
        ("system/*.read", "*", "rs"),
        ("system/Patient.write", "Patient", "cud"),
        ("user/Observation.*", "Observation", "cruds"),
        ("system/DiagnosticReport.rs", "DiagnosticReport", "rs"),
        ("system/*.cruds", "*", "cruds"),
        ("system/Patient.rx", None, None),
        ("system/Patient.rr", None, None),
        ("patient/*.read", None, None),
        ("openid", None, None),
        ("launch/patient", None, None),
    ],
)
def test_parse_scope(scope, rtype, perms):
    grant = parse_scope(scope)
    if rtype is None:
        assert grant is None
    else:
        assert grant.resource_type == rtype and grant.permissions == frozenset(perms)


def test_principal_allows():
    p = principal_for("system/Observation.rs system/*.c")
    assert p.allows("Observation", "r") and p.allows("Observation", "s")
    assert p.allows("Patient", "c") and not p.allows("Patient", "r")
    assert not p.allows("*", "r")
