"""Audit trail (issue 10, fhir_server/audit): every FHIR interaction and legacy prediction leaves
exactly ONE AuditEvent (per Bundle entry for batch/transaction) with the right subtype, action,
outcome, agent and patient; writes and their AuditEvent commit together; AuditEvents are
read-only. Runs on SQLite, and on PostgreSQL with CXR_TEST_POSTGRES_URL."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.auditevent import AuditEvent

from fhir_support import make_app, outcome_of, repo  # noqa: F401  (the sqlite/postgres repo fixture)
from fhir_server.storage import Repository

OBS = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"text": "finding"},
    "subject": {"reference": "Patient/p1"},
}


def _seed(repo: Repository) -> None:
    # written on the bare repository: seeding leaves no AuditEvent
    repo.update("Patient", "p1", {"resourceType": "Patient", "id": "p1", "name": [{"family": "Doe"}]})
    repo.update("Observation", "o1", {**OBS, "id": "o1"})


def _events(repo: Repository) -> list[dict[str, Any]]:
    result = repo.search_params("AuditEvent", [("_count", "100"), ("_sort", "_lastUpdated")])
    return [m.resource for m in result.matches]


def _patients(event: dict) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if e.get("role", {}).get("code") == "1"]


def _subtype(event: dict) -> str:
    return event["subtype"][0]["code"]


@pytest.fixture
def audited(repo):
    _seed(repo)
    with TestClient(make_app(repo)) as client:
        yield client, repo


BUNDLE_URL = "/fhir"

# (name, method, url, body, expected status, subtype, action, outcome, patients)
CASES = [
    ("read-patient", "GET", "/fhir/Patient/p1", None, 200, "read", "R", "0", ["Patient/p1"]),
    ("read", "GET", "/fhir/Observation/o1", None, 200, "read", "R", "0", ["Patient/p1"]),
    ("vread", "GET", "/fhir/Observation/o1/_history/1", None, 200, "vread", "R", "0", ["Patient/p1"]),
    ("search", "GET", "/fhir/Observation?patient=Patient/p1", None, 200, "search-type", "E", "0", ["Patient/p1"]),
    ("history", "GET", "/fhir/Observation/o1/_history", None, 200, "history-instance", "R", "0", []),
    ("create", "POST", "/fhir/Observation", OBS, 201, "create", "C", "0", ["Patient/p1"]),
    ("update", "PUT", "/fhir/Observation/o1", {**OBS, "id": "o1", "status": "amended"}, 200, "update", "U", "0", ["Patient/p1"]),
    ("delete", "DELETE", "/fhir/Observation/o1", None, 204, "delete", "D", "0", ["Patient/p1"]),
    ("read-404", "GET", "/fhir/Observation/nope", None, 404, "read", "R", "4", []),
    ("read-404-patient", "GET", "/fhir/Patient/nope", None, 404, "read", "R", "4", ["Patient/nope"]),
    ("create-400", "POST", "/fhir/Observation", {"resourceType": "Observation", "status": 7}, 400, "create", "C", "4", []),
    ("update-412", "PUT", "/fhir/Observation/o1", {**OBS, "id": "o1"}, 412, "update", "U", "4", []),
    ("auditevent-405", "POST", "/fhir/AuditEvent", {"resourceType": "AuditEvent"}, 405, "create", "C", "4", []),
    ("search-400", "GET", "/fhir/Observation?date=notadate", None, 400, "search-type", "E", "4", []),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_interaction_leaves_exactly_one_audit_event(audited, case):
    client, repo = audited
    name, method, url, body, status, subtype, action, outcome, patients = case
    headers = {"If-Match": 'W/"9"'} if name == "update-412" else {}
    response = client.request(method, url, json=body, headers=headers)
    assert response.status_code == status, response.text
    events = _events(repo)
    assert len(events) == 1, events
    event = events[0]
    AuditEvent.model_validate(event)  # a valid R4(B) AuditEvent
    assert (_subtype(event), event["action"], event["outcome"]) == (subtype, action, outcome)
    assert event["type"]["code"] == "rest"
    assert event["subtype"][0]["system"] == "http://hl7.org/fhir/restful-interaction"
    requestor = next(a for a in event["agent"] if a["requestor"])
    assert requestor["who"]["identifier"]["value"] == "anonymous"  # no principal: auth is off
    assert requestor["network"]["address"] == "testclient"
    assert event["source"]["observer"]["display"] == "CXR-FHIR"
    assert _patients(event) == patients
    if outcome != "0":
        assert str(status) in event["outcomeDesc"]
    if subtype == "search-type":
        query = next(e for e in event["entity"] if e["role"]["code"] == "24")
        assert base64.b64decode(query["query"]).decode() == url.split("?", 1)[1]
    if name in ("read", "update", "delete"):
        what = [e["what"]["reference"] for e in event["entity"] if e["role"]["code"] == "4"]
        assert what and what[0].startswith("Observation/o1/_history/")


def test_failed_write_changes_nothing_and_is_audited_once(audited):
    client, repo = audited
    response = client.put("/fhir/Observation/o1", json={**OBS, "id": "o1", "status": "amended"}, headers={"If-Match": 'W/"5"'})
    assert response.status_code == 412
    assert repo.read("Observation", "o1").resource["status"] == "final"
    [event] = _events(repo)
    assert event["outcome"] == "4" and "412" in event["outcomeDesc"]


def test_write_and_its_audit_event_commit_together(audited, monkeypatch):
    """An AuditEvent that cannot be appended rolls the write back: no unaudited change exists."""
    client, repo = audited
    from fhir_server.storage.repository import Transaction

    def broken_append(self, resource):
        raise RuntimeError("audit table unavailable")

    monkeypatch.setattr(Transaction, "append", broken_append)
    with TestClient(client.app, raise_server_exceptions=False) as c:
        response = c.put("/fhir/Observation/o1", json={**OBS, "id": "o1", "status": "amended"})
    assert response.status_code >= 500
    monkeypatch.undo()
    assert repo.read("Observation", "o1").resource["status"] == "final"
    assert repo.read("Observation", "o1").version_id == 1


def test_read_is_withheld_when_its_audit_event_cannot_be_written(audited, monkeypatch):
    client, repo = audited
    from fhir_server.storage.repository import Transaction

    monkeypatch.setattr(Transaction, "append", lambda self, resource: (_ for _ in ()).throw(RuntimeError("down")))
    response = client.get("/fhir/Patient/p1")
    assert response.status_code == 503
    assert outcome_of(response)["issue"][0]["code"] == "transient"
    assert "Doe" not in response.text


def test_transaction_audits_each_entry_with_its_write(audited):
    client, repo = audited
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:1", "resource": OBS, "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "GET", "url": "Patient/p1"}},
        ],
    }
    response = client.post(BUNDLE_URL, json=bundle)
    assert response.status_code == 200, response.text
    events = _events(repo)
    assert sorted(_subtype(e) for e in events) == ["create", "read"]
    assert all(_patients(e) == ["Patient/p1"] and e["outcome"] == "0" for e in events)


def test_failed_transaction_leaves_one_failure_event_and_no_entry_events(audited):
    client, repo = audited
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": OBS, "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "GET", "url": "Observation/missing"}},
        ],
    }
    response = client.post(BUNDLE_URL, json=bundle)
    assert response.status_code == 404
    [event] = _events(repo)
    assert (_subtype(event), event["outcome"]) == ("transaction", "4")
    assert repo.search_params("Observation", []).total == 1  # the POST entry was rolled back


def test_batch_audits_every_entry_with_its_own_outcome(audited):
    client, repo = audited
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Observation/o1"}},
            {"request": {"method": "GET", "url": "Observation/missing"}},
            {"resource": OBS, "request": {"method": "POST", "url": "Observation"}},
            {"resource": {"resourceType": "AuditEvent"}, "request": {"method": "POST", "url": "AuditEvent"}},
        ],
    }
    response = client.post(BUNDLE_URL, json=bundle)
    assert response.status_code == 200, response.text
    outcomes = sorted((_subtype(e), e["outcome"]) for e in _events(repo))
    assert outcomes[:3] == [("create", "0"), ("create", "4"), ("read", "0")] and outcomes[3] == ("read", "4"), outcomes
    assert len(outcomes) == 4


def test_audit_events_are_searchable_and_read_only(audited):
    client, repo = audited
    client.get("/fhir/Patient/p1")
    client.get("/fhir/Observation/nope")
    found = client.get("/fhir/AuditEvent?patient=Patient/p1&subtype=read&agent=anonymous&date=ge2000-01-01")
    assert found.status_code == 200, found.text
    assert found.json()["total"] == 1
    failures = client.get("/fhir/AuditEvent?outcome=4&entity=Observation/nope")
    assert failures.json()["total"] == 1
    event_id = failures.json()["entry"][0]["resource"]["id"]
    for method, url in (("PUT", f"/fhir/AuditEvent/{event_id}"), ("DELETE", f"/fhir/AuditEvent/{event_id}"),
                        ("POST", "/fhir/AuditEvent"), ("PATCH", f"/fhir/AuditEvent/{event_id}"),
                        ("DELETE", "/fhir/AuditEvent?outcome=4")):
        response = client.request(method, url, json={"resourceType": "AuditEvent", "id": event_id})
        assert response.status_code == 405, (method, url, response.text)
        assert outcome_of(response)["issue"][0]["code"] == "not-supported"
    assert client.get(f"/fhir/AuditEvent/{event_id}").status_code == 200
    # the audit log stays out of other types' searches and of system history
    assert client.get("/fhir/Patient?_revinclude=AuditEvent:patient", headers={"Prefer": "handling=strict"}).status_code == 400
    history = client.get("/fhir/_history?_count=100").json()
    assert all(e["resource"]["resourceType"] != "AuditEvent" for e in history.get("entry", []) if "resource" in e)
    # reading the audit log is itself audited (BALP), without naming a patient
    reads = repo.search_params("AuditEvent", [("entity", f"AuditEvent/{event_id}"), ("subtype", "read")]).matches
    assert len(reads) == 1 and _patients(reads[0].resource) == []


def test_forbidden_request_is_audited(repo):
    _seed(repo)
    app = make_app(repo, auth_enabled=True, auth_dev_static_tokens=True, auth_tokens={"tok": "system/Patient.read"})
    with TestClient(app) as client:
        response = client.get("/fhir/Observation/o1", headers={"Authorization": "Bearer tok"})
        assert response.status_code == 403
        unauthenticated = client.get("/fhir/Patient/p1")
        assert unauthenticated.status_code == 401
    events = _events(repo)
    assert [(e["outcome"], e["outcomeDesc"].split(":")[0]) for e in events] == [("4", "HTTP 403"), ("4", "HTTP 401")]
    assert _patients(events[1]) == ["Patient/p1"]


def test_agent_is_the_principals_client_id(repo):
    """The agent is the client id the auth layer puts on request.state.principal (here a dev token's)."""
    _seed(repo)
    app = make_app(repo, auth_enabled=True, auth_dev_static_tokens=True,
                   auth_tokens={"tok": "system/Patient.read system/AuditEvent.rs"})
    with TestClient(app) as client:
        auth = {"Authorization": "Bearer tok"}
        assert client.get("/fhir/Patient/p1", headers=auth).status_code == 200
        [event] = client.get("/fhir/AuditEvent?subtype=read", headers=auth).json()["entry"]
        client_id = event["resource"]["agent"][0]["who"]["identifier"]["value"]
        assert client_id.startswith("dev-token-")
        assert client.get(f"/fhir/AuditEvent?agent={client_id}&subtype=read", headers=auth).json()["total"] == 1


def _operation_events(client) -> list[dict]:
    return _events(client.app.state.store)


def test_analyze_and_legacy_predict_are_audited(tmp_path):
    from analyze_support import make_client, media, png_b64, wait_until
    from model_fixtures import png_bytes, quadrant_pixels

    with make_client(tmp_path) as client:
        response = client.post("/fhir/Media/$analyze", json=media())
        assert response.status_code == 201, response.text
        [event] = _operation_events(client)
        assert (_subtype(event), event["action"], event["outcome"]) == ("operation", "E", "0")
        assert _patients(event) == ["Patient/p1"]
        written = {e["what"]["reference"].split("/")[0] for e in event["entity"] if "what" in e}
        assert {"DiagnosticReport", "Media"} <= written
        assert any(d["valueString"] == "$analyze" for e in event["entity"] for d in e.get("detail", []))

        accepted = client.post("/fhir/Media/$analyze", json=media(png_b64("bottom_right")), headers={"Prefer": "respond-async"})
        assert accepted.status_code == 202, accepted.text
        events = _operation_events(client)
        assert len(events) == 2 and events[1]["outcome"] == "0"
        assert any(e["what"]["reference"].startswith("Task/") for e in events[1]["entity"] if "what" in e)
        wait_until(lambda: client.app.state.store.search_params("Task", [("status", "completed")]).total == 1)
        # the job's result write has its own AuditEvent, committed with the results
        result = _operation_events(client)[2]
        assert (result["outcome"], _patients(result)) == ("0", ["Patient/p1"])
        assert any(e["what"]["reference"].startswith("DiagnosticReport/") for e in result["entity"] if "what" in e)

        predicted = client.post("/api/v1/predict", files={"image": ("x.png", png_bytes(quadrant_pixels(96, 96)), "image/png")})
        assert predicted.status_code == 200, predicted.text
        refused = client.post("/api/v1/predict", files={"image": ("x.png", b"not an image", "image/png")})
        assert refused.status_code in (400, 415)
        legacy = _operation_events(client)[3:]
        assert [(e["outcome"], _subtype(e)) for e in legacy] == [("0", "operation"), ("4", "operation")]
        assert all(d["valueString"].startswith("predict") for e in legacy for x in e["entity"] for d in x.get("detail", []))


def test_unauditable_legacy_prediction_is_a_legacy_503(tmp_path, monkeypatch):
    from analyze_support import make_client
    from model_fixtures import png_bytes, quadrant_pixels

    from fhir_server.storage.repository import Transaction

    with make_client(tmp_path) as client:
        monkeypatch.setattr(Transaction, "append", lambda self, resource: (_ for _ in ()).throw(RuntimeError("down")))
        response = client.post("/api/v1/predict", files={"image": ("x.png", png_bytes(quadrant_pixels(96, 96)), "image/png")})
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json()["status"] == "error" and response.json()["error"]["code"] == "audit_unavailable"
        assert "prediction" not in response.text


def test_bench_measures_both_modes(repo, capsys):
    from fhir_server.audit import bench

    reads, creates = bench.measure(repo, True, 3)
    assert reads > 0 and creates > 0
    assert len(_events(repo)) == 3 + 20 + 3  # warm-up reads, timed reads, creates: all audited
