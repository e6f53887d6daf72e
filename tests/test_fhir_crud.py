"""REST read/vread/create/update/delete, conditional create, If-Match, Prefer, validation,
content negotiation and Binary, over HTTP (TestClient) on every available database."""

from __future__ import annotations

import base64

import pytest
from fhir_support import FHIR_JSON, make_app, outcome_of

from fhir_server.storage import VersionConflict

pytest_plugins = ["fhir_support"]  # the repo / client fixtures (SQLite + PostgreSQL)


def patient(**extra):
    return {"resourceType": "Patient", "name": [{"family": "Doe", "given": ["Jane"]}], "gender": "female", **extra}


def observation(**extra):
    return {
        "resourceType": "Observation",
        "status": "preliminary",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "233604007"}]},
        **extra,
    }


def test_create_returns_201_location_etag_last_modified(client):
    r = client.post("/fhir/Patient", json=patient(), headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 201
    body = r.json()
    assert r.headers["content-type"] == "application/fhir+json; charset=utf-8"
    assert r.headers["location"] == f"http://testserver/fhir/Patient/{body['id']}/_history/1"
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["last-modified"].endswith(" GMT")
    assert body["meta"]["versionId"] == "1" and body["meta"]["lastUpdated"]
    assert body["name"] == [{"family": "Doe", "given": ["Jane"]}]


def test_read_vread_and_if_none_match(client):
    created = client.post("/fhir/Patient", json=patient()).json()
    pid = created["id"]
    r = client.get(f"/fhir/Patient/{pid}")
    assert r.status_code == 200 and r.json() == created and r.headers["etag"] == 'W/"1"'
    assert client.get(f"/fhir/Patient/{pid}", headers={"If-None-Match": 'W/"1"'}).status_code == 304
    client.put(f"/fhir/Patient/{pid}", json={**created, "gender": "other"})
    assert client.get(f"/fhir/Patient/{pid}/_history/1").json()["gender"] == "female"
    assert client.get(f"/fhir/Patient/{pid}/_history/2").json()["gender"] == "other"
    r = client.get(f"/fhir/Patient/{pid}/_history/7")
    assert r.status_code == 404 and outcome_of(r)["issue"][0]["code"] == "not-found"
    r = client.get("/fhir/Patient/does-not-exist")
    assert r.status_code == 404 and "not known" in outcome_of(r)["issue"][0]["diagnostics"]


def test_update_rules(client):
    created = client.post("/fhir/Patient", json=patient()).json()
    pid = created["id"]
    r = client.put(f"/fhir/Patient/{pid}", json={**created, "gender": "male"})
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "2" and r.headers["etag"] == 'W/"2"'
    # body id must be present and match the URL
    r = client.put(f"/fhir/Patient/{pid}", json={**created, "id": "other"})
    assert r.status_code == 400 and outcome_of(r)["issue"][0]["expression"] == ["Patient.id"]
    r = client.put(f"/fhir/Patient/{pid}", json=patient())
    assert r.status_code == 400
    # resourceType must match the URL
    r = client.put(f"/fhir/Patient/{pid}", json={**observation(), "id": pid})
    assert r.status_code == 400 and outcome_of(r)["issue"][0]["expression"] == ["Patient.resourceType"]
    # update-as-create with a client id
    r = client.put("/fhir/Patient/client-chosen", json=patient(id="client-chosen"))
    assert r.status_code == 201 and r.headers["location"].endswith("/Patient/client-chosen/_history/1")


def test_delete_then_gone(client):
    pid = client.post("/fhir/Patient", json=patient()).json()["id"]
    r = client.delete(f"/fhir/Patient/{pid}")
    assert r.status_code == 204 and r.headers["etag"] == 'W/"2"'
    r = client.get(f"/fhir/Patient/{pid}")
    assert r.status_code == 410
    assert outcome_of(r)["issue"][0]["code"] == "deleted"
    assert client.get(f"/fhir/Patient/{pid}/_history/1").status_code == 200
    assert client.get(f"/fhir/Patient/{pid}/_history/2").status_code == 410
    assert client.delete(f"/fhir/Patient/{pid}").status_code == 204  # idempotent
    r = client.delete(f"/fhir/Patient/{pid}", headers={"Prefer": "return=OperationOutcome"})
    assert r.status_code == 200 and outcome_of(r)["issue"][0]["severity"] == "information"


def test_unknown_and_unsupported_types_are_404(client):
    r = client.get("/fhir/Encounter/1")
    assert r.status_code == 404 and "not supported" in outcome_of(r)["issue"][0]["diagnostics"]
    r = client.post("/fhir/Nonsense", json={"resourceType": "Nonsense"})
    assert r.status_code == 404 and "Unknown resource type" in outcome_of(r)["issue"][0]["diagnostics"]
    assert client.get("/fhir/Encounter").status_code == 404


def test_conditional_create(client):
    study = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": "Patient/p"},
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.1"}],
    }
    cond = {"If-None-Exist": "identifier=urn:dicom:uid|urn:oid:1.2.840.1"}
    first = client.post("/fhir/ImagingStudy", json=study, headers=cond)
    assert first.status_code == 201
    again = client.post("/fhir/ImagingStudy", json=study, headers=cond)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    client.post("/fhir/ImagingStudy", json=study)
    r = client.post("/fhir/ImagingStudy", json=study, headers=cond)
    assert r.status_code == 412 and outcome_of(r)
    r = client.post("/fhir/ImagingStudy", json=study, headers={"If-None-Exist": "nonsense-param=1"})
    assert r.status_code == 400  # an ignored criterion would match everything


def test_if_match(client):
    created = client.post("/fhir/Patient", json=patient()).json()
    pid = created["id"]
    r = client.put(f"/fhir/Patient/{pid}", json=created, headers={"If-Match": 'W/"3"'})
    assert r.status_code == 412 and outcome_of(r)
    r = client.put(f"/fhir/Patient/{pid}", json=created, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200
    assert client.delete(f"/fhir/Patient/{pid}", headers={"If-Match": 'W/"1"'}).status_code == 412
    assert client.put(f"/fhir/Patient/{pid}", json=created, headers={"If-Match": "garbage"}).status_code == 412


def test_concurrent_conflict_is_409(tmp_path):
    from fastapi.testclient import TestClient

    from fhir_server.storage import Repository

    class RacingRepo(Repository):
        def update(self, *args, **kwargs):
            raise VersionConflict("Patient/x was changed by another request; retry")

    app = make_app(RacingRepo.from_url(f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    r = TestClient(app).put("/fhir/Patient/x", json=patient(id="x"))
    assert r.status_code == 409 and outcome_of(r)["issue"][0]["code"] == "conflict"


@pytest.mark.parametrize(
    ("prefer", "has_body"),
    [("return=minimal", False), ("return=representation", True), ("return=OperationOutcome", True)],
)
def test_prefer_return(client, prefer, has_body):
    r = client.post("/fhir/Patient", json=patient(), headers={"Prefer": prefer})
    assert r.status_code == 201 and r.headers["location"] and r.headers["etag"]
    if not has_body:
        assert r.content == b""
    elif "OperationOutcome" in prefer:
        assert r.json()["resourceType"] == "OperationOutcome"
        assert r.json()["issue"][0]["severity"] == "information"
    else:
        assert r.json()["resourceType"] == "Patient"


def test_validation_errors_have_paths(client):
    r = client.post("/fhir/Patient", json=patient(foo=1))
    assert r.status_code == 400
    assert outcome_of(r)["issue"][0]["expression"] == ["Patient.foo"]
    r = client.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"given": "Jane"}]})
    assert r.status_code == 400 and outcome_of(r)["issue"][0]["expression"] == ["Patient.name[0].given"]
    r = client.post("/fhir/Observation", json=observation(status="bogus"))
    assert r.status_code == 422
    issue = outcome_of(r)["issue"][0]
    assert issue["expression"] == ["Observation.status"] and issue["code"] == "code-invalid"
    r = client.post("/fhir/Patient", json=patient(gender="m"))
    assert r.status_code == 422 and outcome_of(r)["issue"][0]["expression"] == ["Patient.gender"]
    r = client.post("/fhir/Observation", json={"resourceType": "Observation", "status": "final"})
    assert r.status_code == 400 and outcome_of(r)["issue"][0]["expression"] == ["Observation.code"]
    r = client.post("/fhir/Patient", json=observation())
    assert r.status_code == 400 and "does not match" in outcome_of(r)["issue"][0]["diagnostics"]
    r4b_only = {"url": "http://example.org/x", "valueCodeableReference": {"concept": {"text": "x"}}}
    r = client.post("/fhir/Patient", json=patient(extension=[r4b_only]))
    assert r.status_code == 400
    assert outcome_of(r)["issue"][0]["expression"] == ["Patient.extension[0].valueCodeableReference"]
    r = client.post("/fhir/Patient", content=b"{not json", headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 400 and "not valid JSON" in outcome_of(r)["issue"][0]["diagnostics"]
    r = client.post("/fhir/Patient", content=b"[1]", headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 400
    r = client.post("/fhir/Patient", content=b"", headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 400
    for status, rtype, extra in [
        ("bogus", "DiagnosticReport", {"code": {"text": "x"}}),
        ("bogus", "Media", {"content": {"contentType": "image/png"}}),
        ("bogus", "ImagingStudy", {"subject": {"reference": "Patient/1"}}),
        ("bogus", "Task", {"intent": "order"}),
        ("bogus", "Endpoint", {"connectionType": {"code": "dicom-wado-rs"}, "payloadType": [{"text": "x"}], "address": "http://x"}),
    ]:
        r = client.post(f"/fhir/{rtype}", json={"resourceType": rtype, "status": status, **extra})
        assert r.status_code == 422, (rtype, r.text)
        assert outcome_of(r)["issue"][0]["expression"] == [f"{rtype}.status"]


def test_content_negotiation(client):
    pid = client.post("/fhir/Patient", json=patient(), headers={"Content-Type": "application/json"}).json()["id"]
    url = f"/fhir/Patient/{pid}"
    assert client.get(url, headers={"Accept": "application/fhir+xml"}).status_code == 406
    assert client.get(url, headers={"Accept": "text/html"}).status_code == 406
    r = client.get(url + "?_format=xml")
    assert r.status_code == 406 and outcome_of(r)["issue"][0]["code"] == "not-supported"
    r = client.get(url + "?_format=json", headers={"Accept": "application/fhir+xml"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json; charset=utf-8"
    assert client.get(url + "?_format=application/fhir+json").status_code == 200
    r = client.get(url, headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json; charset=utf-8"
    r = client.get(url, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert r.status_code == 200 and r.headers["content-type"].startswith(FHIR_JSON)
    assert client.get(url + "?_pretty=true").text.startswith('{\n  "resourceType"')
    r = client.post("/fhir/Patient", content=b"<Patient/>", headers={"Content-Type": "application/fhir+xml"})
    assert r.status_code == 415 and outcome_of(r)
    r = client.post("/fhir/Patient", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def test_binary_raw_and_json(client):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(50))
    r = client.post("/fhir/Binary", json={"resourceType": "Binary", "contentType": "image/png", "data": base64.b64encode(png).decode()})
    assert r.status_code == 201
    bid = r.json()["id"]
    raw = client.get(f"/fhir/Binary/{bid}", headers={"Accept": "image/png"})
    assert raw.status_code == 200 and raw.content == png and raw.headers["content-type"] == "image/png"
    assert raw.headers["x-content-type-options"] == "nosniff" and raw.headers["etag"] == 'W/"1"'
    assert client.get(f"/fhir/Binary/{bid}").content == png  # no Accept: the content itself
    as_json = client.get(f"/fhir/Binary/{bid}", headers={"Accept": FHIR_JSON})
    assert as_json.json()["resourceType"] == "Binary" and as_json.json()["contentType"] == "image/png"
    assert client.get(f"/fhir/Binary/{bid}?_format=json").json()["resourceType"] == "Binary"
    # raw upload: the body is the content, its Content-Type the Binary.contentType
    r = client.post("/fhir/Binary", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 201
    stored = r.json()
    assert stored["contentType"] == "image/png" and base64.b64decode(stored["data"]) == png
    r = client.post("/fhir/Binary", json={"resourceType": "Binary", "contentType": "image/png", "data": "!!!"})
    assert r.status_code == 400 and outcome_of(r)["issue"][0]["expression"] == ["Binary.data"]


def test_instance_and_type_history(client):
    created = client.post("/fhir/Patient", json=patient()).json()
    pid = created["id"]
    client.put(f"/fhir/Patient/{pid}", json={**created, "gender": "male"})
    client.delete(f"/fhir/Patient/{pid}")
    client.post("/fhir/Patient", json=patient())
    r = client.get(f"/fhir/Patient/{pid}/_history")
    assert r.status_code == 200
    bundle = r.json()
    assert bundle["type"] == "history" and bundle["total"] == 3
    methods = [e["request"]["method"] for e in bundle["entry"]]
    assert methods == ["DELETE", "PUT", "POST"]
    assert "resource" not in bundle["entry"][0]
    assert bundle["entry"][1]["resource"]["meta"]["versionId"] == "2"
    assert bundle["entry"][2]["response"]["status"].startswith("201")
    assert client.get("/fhir/Patient/_history").json()["total"] == 4
    paged = client.get("/fhir/Patient/_history?_count=1").json()
    assert len(paged["entry"]) == 1 and any(link["relation"] == "next" for link in paged["link"])
    assert client.get("/fhir/_history").json()["total"] == 4
    assert client.get("/fhir/Patient/nope/_history").status_code == 404
    assert client.get("/fhir/Patient/_history?_since=not-a-date").status_code == 400


def test_every_supported_type_round_trips(client):
    resources = [
        patient(),
        {"resourceType": "Media", "status": "completed", "content": {"contentType": "image/png"}},
        {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": "Patient/1"}},
        {"resourceType": "Endpoint", "status": "active", "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"}, "payloadType": [{"text": "DICOM"}], "address": "https://pacs.example/wado"},
        {"resourceType": "DiagnosticReport", "status": "preliminary", "code": {"text": "x"}},
        observation(),
        {"resourceType": "Device", "status": "active"},
        {"resourceType": "Provenance", "target": [{"reference": "Patient/1"}], "recorded": "2024-01-01T00:00:00Z", "agent": [{"who": {"reference": "Device/1"}}]},
        {"resourceType": "Binary", "contentType": "text/plain", "data": "aGk="},
        {"resourceType": "Task", "status": "requested", "intent": "order"},
        {"resourceType": "OperationDefinition", "name": "x", "status": "active", "kind": "operation", "code": "x", "system": False, "type": True, "instance": False},
    ]
    for resource in resources:
        rtype = resource["resourceType"]
        r = client.post(f"/fhir/{rtype}", json=resource)
        assert r.status_code == 201, (rtype, r.text)
        rid = r.json()["id"]
        read = client.get(f"/fhir/{rtype}/{rid}", headers={"Accept": FHIR_JSON})
        assert read.status_code == 200 and read.json()["resourceType"] == rtype
        assert client.get(f"/fhir/{rtype}?_id={rid}").json()["total"] == 1
