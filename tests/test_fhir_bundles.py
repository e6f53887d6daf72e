"""Transaction (all-or-nothing, urn:uuid resolution, ifNoneExist/ifMatch, order) and batch Bundles."""

from __future__ import annotations

import pytest
from fhir_support import outcome_of

pytest_plugins = ["fhir_support"]  # the repo / client fixtures (SQLite + PostgreSQL)


def tx_bundle(*entries, kind="transaction"):
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(url, resource, full_url=None, **request):
    entry = {"resource": resource, "request": {"method": "POST", "url": url, **request}}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


PATIENT = {"resourceType": "Patient", "gender": "female", "identifier": [{"system": "urn:mrn", "value": "42"}]}


def obs(subject, status="preliminary"):
    return {"resourceType": "Observation", "status": status, "code": {"text": "x"}, "subject": {"reference": subject}}


def count(client, rtype):
    return client.get(f"/fhir/{rtype}?_summary=count").json()["total"]


def test_transaction_resolves_urn_uuid_references(client):
    bundle = tx_bundle(
        post("Observation", obs("urn:uuid:aaaaaaaa-0000-0000-0000-000000000001"), "urn:uuid:aaaaaaaa-0000-0000-0000-000000000002"),
        post("Patient", PATIENT, "urn:uuid:aaaaaaaa-0000-0000-0000-000000000001"),
        post(
            "DiagnosticReport",
            {"resourceType": "DiagnosticReport", "status": "preliminary", "code": {"text": "x"},
             "subject": {"reference": "urn:uuid:aaaaaaaa-0000-0000-0000-000000000001"},
             "result": [{"reference": "urn:uuid:aaaaaaaa-0000-0000-0000-000000000002"}]},
        ),
        {"request": {"method": "GET", "url": "Observation?subject=urn:uuid:aaaaaaaa-0000-0000-0000-000000000001"}},
    )
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "transaction-response"
    entries = body["entry"]
    assert [e["response"]["status"] for e in entries] == ["201 Created", "201 Created", "201 Created", "200 OK"]
    obs_res, pat_res, rep_res = (e["resource"] for e in entries[:3])
    assert obs_res["subject"]["reference"] == f"Patient/{pat_res['id']}"
    assert rep_res["result"] == [{"reference": f"Observation/{obs_res['id']}"}]
    assert entries[0]["response"]["location"].endswith(f"/Observation/{obs_res['id']}/_history/1")
    assert entries[0]["response"]["etag"] == 'W/"1"' and entries[0]["response"]["lastModified"]
    assert entries[3]["resource"]["total"] == 1  # the GET ran after the writes, with the urn resolved
    stored = client.get(f"/fhir/DiagnosticReport/{rep_res['id']}").json()
    assert stored["subject"]["reference"] == f"Patient/{pat_res['id']}"


def test_transaction_failure_writes_nothing(client):
    bundle = tx_bundle(
        post("Patient", PATIENT, "urn:uuid:1"),
        post("Observation", obs("urn:uuid:1")),
        post("Observation", obs("urn:uuid:1", status="bogus")),
    )
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 422
    issue = outcome_of(r)["issue"][0]
    assert "Bundle.entry[2]" in issue["diagnostics"] and issue["expression"] == ["Bundle.entry[2].resource.status"]
    assert count(client, "Patient") == 0 and count(client, "Observation") == 0


def test_transaction_storage_failure_midway_rolls_back(client):
    existing = client.post("/fhir/Patient", json=PATIENT).json()
    bundle = tx_bundle(
        post("Observation", obs(f"Patient/{existing['id']}")),
        {"resource": {**existing, "gender": "male"}, "request": {"method": "PUT", "url": f"Patient/{existing['id']}", "ifMatch": 'W/"9"'}},
    )
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 412
    assert "Bundle.entry[1]" in outcome_of(r)["issue"][0]["diagnostics"]
    assert count(client, "Observation") == 0
    assert client.get(f"/fhir/Patient/{existing['id']}").json()["meta"]["versionId"] == "1"
    bundle["entry"][1]["request"]["ifMatch"] = 'W/"1"'
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 200
    assert [e["response"]["status"] for e in r.json()["entry"]] == ["201 Created", "200 OK"]
    assert client.get(f"/fhir/Patient/{existing['id']}").json()["gender"] == "male"


def test_transaction_if_none_exist_reuses_the_match_for_references(client):
    existing = client.post("/fhir/Patient", json=PATIENT).json()
    bundle = tx_bundle(
        post("Patient", PATIENT, "urn:uuid:p", ifNoneExist="identifier=urn:mrn|42"),
        post("Observation", obs("urn:uuid:p")),
    )
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    assert entries[0]["response"]["status"] == "200 OK"
    assert entries[0]["resource"]["id"] == existing["id"]
    assert entries[1]["resource"]["subject"]["reference"] == f"Patient/{existing['id']}"
    assert count(client, "Patient") == 1
    client.post("/fhir/Patient", json=PATIENT)
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 412 and count(client, "Observation") == 1


def test_transaction_processing_order_and_put_create(client):
    victim = client.post("/fhir/Patient", json=PATIENT).json()
    bundle = tx_bundle(
        {"request": {"method": "GET", "url": f"Patient/{victim['id']}"}},
        {"resource": {**PATIENT, "id": "fixed-id"}, "request": {"method": "PUT", "url": "Patient/fixed-id"}},
        {"request": {"method": "DELETE", "url": f"Patient/{victim['id']}"}},
    )
    # DELETE runs before GET, so reading the deleted patient fails the whole transaction
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 410 and "Bundle.entry[0]" in outcome_of(r)["issue"][0]["diagnostics"]
    assert client.get(f"/fhir/Patient/{victim['id']}").status_code == 200
    assert client.get("/fhir/Patient/fixed-id").status_code == 404
    bundle["entry"][0]["request"]["url"] = "Patient/fixed-id"
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses == ["200 OK", "201 Created", "204 No Content"]
    assert client.get(f"/fhir/Patient/{victim['id']}").status_code == 410


def test_transaction_rejects_touching_a_resource_twice(client):
    bundle = tx_bundle(
        {"resource": {**PATIENT, "id": "a"}, "request": {"method": "PUT", "url": "Patient/a"}},
        {"request": {"method": "DELETE", "url": "Patient/a"}},
    )
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 400 and count(client, "Patient") == 0


def test_batch_entries_are_independent(client):
    bundle = tx_bundle(
        post("Patient", PATIENT),
        post("Observation", obs("Patient/x", status="bogus")),
        {"request": {"method": "GET", "url": "Patient/missing"}},
        {"request": {"method": "GET", "url": "Patient?identifier=urn:mrn|42"}},
        {"request": {"method": "PATCH", "url": "Patient/x"}},
        {"request": {"method": "GET", "url": "Encounter/1"}},
        kind="batch",
    )
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 200
    body = r.json()
    assert body["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created", "422 Unprocessable Entity", "404 Not Found", "200 OK", "400 Bad Request", "404 Not Found"]
    assert body["entry"][1]["response"]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[1].resource.status"]
    assert body["entry"][3]["resource"]["total"] == 1  # sees the patient created by entry 0
    assert count(client, "Patient") == 1


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"resourceType": "Bundle", "type": "collection", "entry": []}, 400),
        ({"resourceType": "Bundle", "type": "nonsense"}, 422),
        ({"resourceType": "Patient"}, 400),
        ({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": PATIENT}]}, 400),
        ({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": PATIENT, "request": {"method": "FETCH", "url": "Patient"}}]}, 422),
        # conditional update works (tests/test_fhir_conditional.py); an id AND criteria do not
        ({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": PATIENT, "request": {"method": "PUT", "url": "Patient/x?identifier=x"}}]}, 400),
        ({"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "DELETE", "url": "Patient"}}]}, 400),
        ({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": PATIENT, "request": {"method": "POST", "url": "Observation"}}]}, 400),
    ],
)
def test_bad_bundles(client, body, status):
    r = client.post("/fhir", json=body)
    assert r.status_code == status, r.text
    assert outcome_of(r)


def test_empty_transaction_and_prefer_minimal(client):
    r = client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction"})
    assert r.status_code == 200 and r.json()["type"] == "transaction-response"
    r = client.post("/fhir", json=tx_bundle(post("Patient", PATIENT)), headers={"Prefer": "return=minimal"})
    entry = r.json()["entry"][0]
    assert "resource" not in entry and entry["response"]["location"]
