"""Chained search parameters, one level deep (R4 search.html#chaining): `ref.param=value` and
`ref:Type.param=value` over HTTP and in conditional criteria, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from fhir_support import BACKENDS, make_app, make_repo, outcome_of

SCT = "http://snomed.info/sct"
STRICT = {"Prefer": "handling=strict"}

pytest_plugins = ["fhir_support"]  # the repo / client fixtures (SQLite + PostgreSQL)


def load(repo) -> None:
    """Two patients with their MRNs, each with a Media, an Observation derived from it and a
    report; plus a quality-control Observation about the model Device (a non-Patient subject)."""
    with repo.transaction() as tx:
        tx.create({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "12345"}], "name": [{"family": "Müller", "given": ["Anna"]}], "gender": "female"}, resource_id="p1")
        tx.create({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "67890"}], "name": [{"family": "Smith", "given": ["Bob"]}], "gender": "male"}, resource_id="p2")
        tx.create({"resourceType": "Device", "status": "active", "identifier": [{"system": "urn:cxr:model", "value": "m1"}], "deviceName": [{"name": "CXR model", "type": "model-name"}]}, resource_id="d1")
        tx.create({"resourceType": "Media", "status": "completed", "subject": {"reference": "Patient/p1"}, "createdDateTime": "2024-03-01T09:00:00Z", "content": {"contentType": "image/png"}}, resource_id="m1")
        tx.create({"resourceType": "Media", "status": "completed", "subject": {"reference": "Patient/p2"}, "createdDateTime": "2023-06-01", "content": {"contentType": "image/png"}}, resource_id="m2")
        tx.create({"resourceType": "Observation", "status": "preliminary", "code": {"coding": [{"system": SCT, "code": "233604007"}]}, "subject": {"reference": "Patient/p1"}, "derivedFrom": [{"reference": "Media/m1"}]}, resource_id="o1")
        tx.create({"resourceType": "Observation", "status": "preliminary", "code": {"coding": [{"system": SCT, "code": "8186001"}]}, "subject": {"reference": "Patient/p2"}, "derivedFrom": [{"reference": "Media/m2"}]}, resource_id="o2")
        tx.create({"resourceType": "Observation", "status": "final", "code": {"text": "model QC"}, "subject": {"reference": "Device/d1"}}, resource_id="o3")
        tx.create({"resourceType": "DiagnosticReport", "status": "preliminary", "code": {"text": "CXR"}, "subject": {"reference": "Patient/p1"}, "result": [{"reference": "Observation/o1"}]}, resource_id="r1")
        tx.create({"resourceType": "DiagnosticReport", "status": "preliminary", "code": {"text": "CXR"}, "subject": {"reference": "Patient/p2"}, "result": [{"reference": "Observation/o2"}]}, resource_id="r2")


@pytest.fixture(scope="module", params=BACKENDS)
def shared_client(request, tmp_path_factory):
    """One loaded database per backend for the read-only checks."""
    store = make_repo(request.param, tmp_path_factory.mktemp("chain"), schema="cxr_chain_shared")
    load(store)
    with TestClient(make_app(store)) as test_client:
        yield test_client


def search(client, url: str, **kwargs) -> dict:
    r = client.get(url, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def match_ids(bundle: dict) -> list[str]:
    return sorted(e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # the EHR use case: a patient's AI reports by MRN, without looking the Patient up first
        ("/fhir/DiagnosticReport?patient.identifier=urn:mrn|12345", ["r1"]),
        ("/fhir/DiagnosticReport?subject:Patient.identifier=urn:mrn|12345", ["r1"]),
        ("/fhir/DiagnosticReport?subject.identifier=urn:mrn|67890", ["r2"]),
        ("/fhir/DiagnosticReport?patient.identifier=12345", ["r1"]),
        ("/fhir/DiagnosticReport?patient.identifier=urn:mrn|99999", []),
        ("/fhir/DiagnosticReport?patient.identifier=urn:other|12345", []),
        ("/fhir/DiagnosticReport?patient.identifier=urn:mrn|12345,urn:mrn|67890", ["r1", "r2"]),  # comma: OR
        ("/fhir/DiagnosticReport?subject._id=p2", ["r2"]),
        ("/fhir/DiagnosticReport?patient.gender=male", ["r2"]),
        # string semantics of a direct Patient search: accent/case-insensitive prefix, :exact, :contains
        ("/fhir/Observation?subject.name=muller", ["o1"]),
        ("/fhir/Observation?subject.name=SMI", ["o2"]),
        ("/fhir/Observation?subject:Patient.name:exact=Müller", ["o1"]),
        ("/fhir/Observation?subject:Patient.name:exact=muller", []),
        ("/fhir/Observation?subject.name:contains=ll", ["o1"]),
        # no :Type: every stored target type defining the parameter (Patient and Device here)
        ("/fhir/Observation?subject.identifier=urn:cxr:model|m1", ["o3"]),
        ("/fhir/Observation?subject:Patient.identifier=urn:cxr:model|m1", []),
        ("/fhir/Observation?subject:Device.identifier=urn:cxr:model|m1", ["o3"]),
        ("/fhir/Observation?subject.device-name=CXR", ["o3"]),
        # date prefixes of the chained parameter
        ("/fhir/Observation?derived-from:Media.created=ge2024-01-01", ["o1"]),
        ("/fhir/Observation?derived-from:Media.created=lt2024-01-01", ["o2"]),
        ("/fhir/Observation?derived-from.created=2024-03", ["o1"]),
        ("/fhir/Observation?derived-from:Media.created=gt2025-01-01", []),
        # through a list-valued reference
        ("/fhir/DiagnosticReport?result.code=http://snomed.info/sct|233604007", ["r1"]),
        ("/fhir/DiagnosticReport?result.code=8186001", ["r2"]),
        ("/fhir/DiagnosticReport?result:Observation.code:not=8186001", ["r1"]),
        # several chained (and plain) criteria AND together
        ("/fhir/DiagnosticReport?patient.identifier=urn:mrn|12345&result.code=8186001", []),
        ("/fhir/DiagnosticReport?patient.identifier=urn:mrn|12345&result.code=233604007&status=preliminary", ["r1"]),
        ("/fhir/Observation?subject.name=smith&derived-from:Media.created=ge2024-01-01", []),
    ],
)
def test_chained_search(shared_client, url, expected):
    assert match_ids(search(shared_client, url, headers=STRICT)) == expected


def test_chain_in_self_link_and_post_search(shared_client):
    bundle = search(shared_client, "/fhir/DiagnosticReport?patient.identifier=urn:mrn|12345")
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert "patient.identifier=urn%3Amrn%7C12345" in self_link
    assert "outcome" not in {e["search"]["mode"] for e in bundle["entry"]}
    r = shared_client.post("/fhir/DiagnosticReport/_search", data={"subject:Patient.identifier": "urn:mrn|67890"})
    assert r.status_code == 200 and match_ids(r.json()) == ["r2"]


def test_chain_with_include(shared_client):
    url = "/fhir/DiagnosticReport?patient.identifier=urn:mrn|12345&_include=DiagnosticReport:result&_include=DiagnosticReport:subject"
    bundle = search(shared_client, url)
    assert bundle["total"] == 1
    modes = {(e["resource"]["resourceType"], e["resource"]["id"]): e["search"]["mode"] for e in bundle["entry"]}
    assert modes == {("DiagnosticReport", "r1"): "match", ("Observation", "o1"): "include", ("Patient", "p1"): "include"}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("patient.foo", "unknown chained search parameter 'foo'"),
        ("subject:Patient.device-name", "not defined on Patient"),  # a parameter of Device only
        ("status.code", "'status' is not a reference search parameter"),
        ("nosuch.name", "'nosuch' is an unknown search parameter"),
        ("result.subject.name", "only one level of chaining is supported"),  # deep chain
    ],
)
def test_unsupported_chains_lenient_and_strict(shared_client, name, message):
    # lenient (the default): ignored, reported in the outcome entry, the other criteria applied
    bundle = search(shared_client, f"/fhir/DiagnosticReport?{name}=x&status=preliminary")
    assert bundle["total"] == 2
    outcome = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome and outcome[0]["issue"][0]["expression"] == [name]
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert name not in self_link
    r = shared_client.get(f"/fhir/DiagnosticReport?{name}=x", headers=STRICT)
    assert r.status_code == 400 and message in outcome_of(r)["issue"][0]["diagnostics"]


@pytest.mark.parametrize(
    "query",
    [
        "derived-from:Media.created=ge2024-13-01",  # bad date value
        "subject.name:fuzzy=x",  # unknown modifier of the chained parameter
        "subject:Foo.name=x",  # not a resource type
        "subject:Binary._id=x",  # a type Observation.subject cannot refer to
        "patient.identifier=",  # empty value
    ],
)
def test_malformed_chains_are_400_whatever_the_handling(shared_client, query):
    r = shared_client.get(f"/fhir/Observation?{query}")
    assert r.status_code == 400 and outcome_of(r)


def test_deleted_or_changed_target_no_longer_matches(client, repo):
    load(repo)
    url = "/fhir/DiagnosticReport?patient.identifier=urn:mrn|12345"
    assert match_ids(search(client, url)) == ["r1"]
    assert client.delete("/fhir/Patient/p1").status_code in (200, 204)
    assert match_ids(search(client, url)) == []
    # only the current version of a target counts: p2's old MRN stops matching when it changes
    p2 = client.get("/fhir/Patient/p2").json()
    p2["identifier"] = [{"system": "urn:mrn", "value": "55555"}]
    assert client.put("/fhir/Patient/p2", json=p2).status_code == 200
    assert match_ids(search(client, "/fhir/DiagnosticReport?patient.identifier=urn:mrn|67890")) == []
    assert match_ids(search(client, "/fhir/DiagnosticReport?patient.identifier=urn:mrn|55555")) == ["r2"]


def test_chained_conditional_create(client, repo):
    load(repo)
    obs = {"resourceType": "Observation", "status": "preliminary", "code": {"coding": [{"system": SCT, "code": "233604007"}]}, "subject": {"reference": "Patient/p1"}}
    found = client.post("/fhir/Observation", json=obs, headers={"If-None-Exist": "subject:Patient.identifier=urn:mrn|12345&code=233604007"})
    assert found.status_code == 200 and found.json()["id"] == "o1"
    created = client.post("/fhir/Observation", json=obs, headers={"If-None-Exist": "patient.identifier=urn:mrn|12345&code=8186001"})
    assert created.status_code == 201 and created.json()["id"] != "o1"
    # conditional criteria are strict: an unknown chained parameter would match too much
    r = client.post("/fhir/Observation", json=obs, headers={"If-None-Exist": "patient.foo=1"})
    assert r.status_code == 400 and "foo" in outcome_of(r)["issue"][0]["diagnostics"]
    with repo.transaction() as tx:
        assert [m.id for m in tx.find("DiagnosticReport", "patient.identifier=urn:mrn|67890")] == ["r2"]


def test_capability_statement_mentions_chaining(shared_client):
    rest = shared_client.get("/fhir/metadata").json()["rest"][0]
    assert "chained one level deep" in rest["documentation"]
