"""Search over HTTP: parameters of FHIR.md section 7, prefixes, modifiers, paging, sorting,
_include/_revinclude, _summary=count, strict/lenient handling, POST _search."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from fhir_support import BACKENDS, make_app, make_repo, outcome_of

SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"

pytest_plugins = ["fhir_support"]  # the repo / client fixtures (SQLite + PostgreSQL)


def load(repo):
    """A small realistic graph: 2 patients, a study, a Media, a report with 2 observations,
    a Device, a Provenance, a Task, an Endpoint."""
    with repo.transaction() as tx:
        p1 = tx.create({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "MRN1"}], "name": [{"family": "Müller", "given": ["Anna"]}], "gender": "female", "birthDate": "1970-03-04"}, resource_id="p1")
        p2 = tx.create({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "MRN2"}], "name": [{"family": "Smith", "given": ["Bob"]}], "gender": "male", "birthDate": "1985"}, resource_id="p2")
        ep = tx.create({"resourceType": "Endpoint", "status": "active", "identifier": [{"value": "pacs-1"}], "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"}, "payloadType": [{"text": "DICOM"}], "address": "https://pacs.example/wado"}, resource_id="ep1")
        study = tx.create({
            "resourceType": "ImagingStudy", "status": "available", "subject": {"reference": "Patient/p1"},
            "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}], "started": "2024-03-01T10:00:00Z",
            "endpoint": [{"reference": "Endpoint/ep1"}],
            "series": [{"uid": "1.2.3.4.5", "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}, "instance": [{"uid": "1.2.3.4.5.6", "sopClass": {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.1.1"}}]}],
        }, resource_id="s1")
        media = tx.create({"resourceType": "Media", "status": "completed", "subject": {"reference": "Patient/p2"}, "createdDateTime": "2024-05-06", "modality": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CR"}]}, "view": {"coding": [{"system": SCT, "code": "399348003"}]}, "identifier": [{"value": "img-1"}], "content": {"contentType": "image/png"}}, resource_id="m1")
        device = tx.create({"resourceType": "Device", "status": "active", "identifier": [{"system": "urn:cxr:model", "value": "pneumonia-v1"}], "deviceName": [{"name": "CXR Pneumonia Model", "type": "model-name"}]}, resource_id="d1")
        o1 = tx.create({"resourceType": "Observation", "status": "preliminary", "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]}], "code": {"coding": [{"system": SCT, "code": "233604007"}]}, "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-03-01T10:05:00Z", "valueQuantity": {"value": 0.82, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1"}, "device": {"reference": "Device/d1"}, "derivedFrom": [{"reference": "ImagingStudy/s1"}]}, resource_id="o1")
        o2 = tx.create({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": SCT, "code": "8186001"}, {"code": "local-only"}]}, "subject": {"reference": "Patient/p2"}, "effectivePeriod": {"start": "2023-01-01", "end": "2023-06-30"}, "valueQuantity": {"value": 0.1}, "derivedFrom": [{"reference": "Media/m1"}]}, resource_id="o2")
        dr = tx.create({"resourceType": "DiagnosticReport", "status": "preliminary", "identifier": [{"system": "urn:cxr:report", "value": "R1"}], "category": [{"coding": [{"system": LOINC, "code": "LP29684-5"}]}, {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}], "code": {"coding": [{"system": LOINC, "code": "36554-4"}]}, "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-03-01", "result": [{"reference": "Observation/o1"}, {"reference": "Observation/o2"}]}, resource_id="r1")
        tx.create({"resourceType": "Provenance", "target": [{"reference": "DiagnosticReport/r1"}, {"reference": "Observation/o1"}], "recorded": "2024-03-01T10:06:00Z", "agent": [{"who": {"reference": "Device/d1"}}], "entity": [{"role": "source", "what": {"reference": "ImagingStudy/s1"}}]}, resource_id="prov1")
        tx.create({"resourceType": "Task", "status": "completed", "intent": "order", "code": {"coding": [{"system": "urn:cxr", "code": "analyze"}]}, "focus": {"reference": "ImagingStudy/s1"}, "owner": {"reference": "Device/d1"}, "output": [{"type": {"text": "report"}, "valueReference": {"reference": "DiagnosticReport/r1"}}]}, resource_id="t1")
    return {"p1": p1, "p2": p2, "ep": ep, "study": study, "media": media, "device": device, "o1": o1, "o2": o2, "dr": dr}


@pytest.fixture
def data(repo):
    return load(repo)


@pytest.fixture(scope="module", params=BACKENDS)
def shared_client(request, tmp_path_factory):
    """One loaded database per backend for the many read-only parameter checks."""
    store = make_repo(request.param, tmp_path_factory.mktemp("search"), schema="cxr_search_shared")
    load(store)
    with TestClient(make_app(store)) as test_client:
        yield test_client


def ids(client, url, **kwargs):
    r = client.get(url, **kwargs)
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return sorted(e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/fhir/DiagnosticReport?subject=Patient/p1", ["r1"]),
        ("/fhir/DiagnosticReport?patient=p1", ["r1"]),
        ("/fhir/DiagnosticReport?patient=p2", []),
        ("/fhir/DiagnosticReport?subject=http://testserver/fhir/Patient/p1", ["r1"]),
        ("/fhir/DiagnosticReport?status=preliminary", ["r1"]),
        ("/fhir/DiagnosticReport?code=http://loinc.org|36554-4", ["r1"]),
        ("/fhir/DiagnosticReport?category=RAD", ["r1"]),
        ("/fhir/DiagnosticReport?category=http://loinc.org|LP29684-5", ["r1"]),
        ("/fhir/DiagnosticReport?identifier=urn:cxr:report|R1", ["r1"]),
        ("/fhir/DiagnosticReport?date=2024-03", ["r1"]),
        ("/fhir/DiagnosticReport?date=lt2024-03-01", []),
        ("/fhir/DiagnosticReport?result=Observation/o2", ["r1"]),
        ("/fhir/Observation?code=233604007", ["o1"]),
        ("/fhir/Observation?code=http://snomed.info/sct|", ["o1", "o2"]),
        ("/fhir/Observation?code=|local-only", ["o2"]),
        ("/fhir/Observation?code=http://loinc.org|local-only", []),
        ("/fhir/Observation?code=233604007,8186001", ["o1", "o2"]),
        ("/fhir/Observation?code:not=233604007", ["o2"]),
        ("/fhir/Observation?category=imaging", ["o1"]),
        ("/fhir/Observation?category:missing=true", ["o2"]),
        ("/fhir/Observation?patient=Patient/p2", ["o2"]),
        ("/fhir/Observation?subject:Patient=p1", ["o1"]),
        ("/fhir/Observation?derived-from=ImagingStudy/s1", ["o1"]),
        ("/fhir/Observation?derived-from=Media/m1", ["o2"]),
        ("/fhir/Observation?device=Device/d1", ["o1"]),
        ("/fhir/Observation?date=2023", ["o2"]),
        ("/fhir/Observation?date=ge2024-01-01", ["o1"]),
        ("/fhir/Observation?date=sa2023-12-31", ["o1"]),
        ("/fhir/Observation?date=eb2024-01-01", ["o2"]),
        ("/fhir/Observation?date=gt2023-03-01&date=lt2024-12-31", ["o1", "o2"]),
        ("/fhir/Observation?date=ge2023-01-01&date=le2023-12-31", ["o2"]),
        ("/fhir/Observation?value-quantity=gt0.5", ["o1"]),
        ("/fhir/Observation?value-quantity=0.1", ["o2"]),
        ("/fhir/Observation?status=final&code=8186001", ["o2"]),
        ("/fhir/Observation?status=final&code=233604007", []),
        ("/fhir/ImagingStudy?patient=p1", ["s1"]),
        ("/fhir/ImagingStudy?identifier=urn:dicom:uid|urn:oid:1.2.3.4", ["s1"]),
        ("/fhir/ImagingStudy?started=2024-03-01", ["s1"]),
        ("/fhir/ImagingStudy?started=ne2024-03-01", []),
        ("/fhir/ImagingStudy?modality=DX", ["s1"]),
        ("/fhir/ImagingStudy?modality=CR", []),
        ("/fhir/ImagingStudy?series=1.2.3.4.5", ["s1"]),
        ("/fhir/ImagingStudy?instance=1.2.3.4.5.6", ["s1"]),
        ("/fhir/ImagingStudy?endpoint=Endpoint/ep1", ["s1"]),
        ("/fhir/Media?patient=p2", ["m1"]),
        ("/fhir/Media?subject=Patient/p2", ["m1"]),
        ("/fhir/Media?created=2024-05", ["m1"]),
        ("/fhir/Media?created=gt2024-06", []),
        ("/fhir/Media?modality=CR", ["m1"]),
        ("/fhir/Media?view=http://snomed.info/sct|399348003", ["m1"]),
        ("/fhir/Media?identifier=img-1", ["m1"]),
        ("/fhir/Patient?identifier=urn:mrn|MRN2", ["p2"]),
        ("/fhir/Patient?name=mul", ["p1"]),
        ("/fhir/Patient?name=MÜLLER", ["p1"]),
        ("/fhir/Patient?name=bob", ["p2"]),
        ("/fhir/Patient?family=smi", ["p2"]),
        ("/fhir/Patient?family:exact=Smith", ["p2"]),
        ("/fhir/Patient?family:exact=smith", []),
        ("/fhir/Patient?family:contains=ll", ["p1"]),
        ("/fhir/Patient?given=anna", ["p1"]),
        ("/fhir/Patient?birthdate=1970-03-04", ["p1"]),
        ("/fhir/Patient?birthdate=1985-07-01", []),
        ("/fhir/Patient?birthdate=ge1985-01-01", ["p2"]),
        ("/fhir/Patient?birthdate=lt1980", ["p1"]),
        ("/fhir/Patient?gender=male", ["p2"]),
        ("/fhir/Patient?gender=male,female", ["p1", "p2"]),
        ("/fhir/Patient?_id=p1,p2", ["p1", "p2"]),
        ("/fhir/Patient?_id=p1", ["p1"]),
        ("/fhir/Task?status=completed", ["t1"]),
        ("/fhir/Task?focus=ImagingStudy/s1", ["t1"]),
        ("/fhir/Task?owner=Device/d1", ["t1"]),
        ("/fhir/Task?code=urn:cxr|analyze", ["t1"]),
        ("/fhir/Provenance?target=DiagnosticReport/r1", ["prov1"]),
        ("/fhir/Provenance?target=Observation/o1", ["prov1"]),
        ("/fhir/Provenance?agent=Device/d1", ["prov1"]),
        ("/fhir/Endpoint?identifier=pacs-1&status=active", ["ep1"]),
        ("/fhir/Endpoint?connection-type=dicom-wado-rs", ["ep1"]),
        ("/fhir/Device?identifier=urn:cxr:model|pneumonia-v1", ["d1"]),
        ("/fhir/Device?device-name=cxr", ["d1"]),
    ],
)
def test_search_parameters(shared_client, url, expected):
    assert ids(shared_client, url) == expected


def test_last_updated_prefixes(client, data):
    stamp = data["p1"].last_updated_instant
    assert "p1" in ids(client, "/fhir/Patient", params={"_lastUpdated": f"ge{stamp}"})
    assert ids(client, "/fhir/Patient", params={"_lastUpdated": "lt2000-01-01"}) == []
    assert ids(client, "/fhir/Patient", params={"_lastUpdated": "gt2000-01-01"}) == ["p1", "p2"]
    r = client.get("/fhir/Patient?_lastUpdated=gtyesterday")
    assert r.status_code == 400 and "date" in outcome_of(r)["issue"][0]["diagnostics"]


def test_paging_links_walk_all_results(client, repo):
    with repo.transaction() as tx:
        for i in range(7):
            tx.create({"resourceType": "Device", "status": "active", "identifier": [{"value": f"dev-{i}"}]})
    first = client.get("/fhir/Device?status=active&_count=3").json()
    assert first["total"] == 7 and len(first["entry"]) == 3
    seen = [e["resource"]["id"] for e in first["entry"]]
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert "previous" not in links and "status=active" in links["self"]
    page = first
    while "next" in {link["relation"] for link in page["link"]}:
        nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
        parts = urlsplit(nxt)
        page = client.get(f"{parts.path}?{parts.query}").json()
        seen += [e["resource"]["id"] for e in page["entry"]]
        assert any(link["relation"] == "previous" for link in page["link"])
    assert len(seen) == 7 and len(set(seen)) == 7


def test_count_capped_zero_and_summary_count(client, repo):
    with repo.transaction() as tx:
        for _ in range(105):
            tx.create({"resourceType": "Device", "status": "inactive"})
    capped = client.get("/fhir/Device?_count=500").json()
    assert capped["total"] == 105 and len(capped["entry"]) == 100
    default = client.get("/fhir/Device").json()
    assert len(default["entry"]) == 20
    summary = client.get("/fhir/Device?_summary=count").json()
    assert summary["total"] == 105 and "entry" not in summary
    assert client.get("/fhir/Device?_count=abc").status_code == 400
    assert client.get("/fhir/Device?_summary=bogus").status_code == 400


def test_sort(client, data):
    assert [e["resource"]["id"] for e in client.get("/fhir/Observation?_sort=date").json()["entry"]] == ["o2", "o1"]
    assert [e["resource"]["id"] for e in client.get("/fhir/Observation?_sort=-date").json()["entry"]] == ["o1", "o2"]
    assert [e["resource"]["id"] for e in client.get("/fhir/Patient?_sort=-_lastUpdated").json()["entry"]] == ["p2", "p1"]
    assert [e["resource"]["id"] for e in client.get("/fhir/Patient?_sort=family").json()["entry"]] == ["p1", "p2"]
    assert [e["resource"]["id"] for e in client.get("/fhir/Patient?_sort=-birthdate").json()["entry"]] == ["p2", "p1"]


def test_include_and_revinclude(client, data):
    bundle = client.get("/fhir/DiagnosticReport?patient=p1&_include=DiagnosticReport:result&_revinclude=Provenance:target").json()
    modes = {(e["resource"]["resourceType"], e["resource"]["id"]): e["search"]["mode"] for e in bundle["entry"]}
    assert modes == {
        ("DiagnosticReport", "r1"): "match",
        ("Observation", "o1"): "include",
        ("Observation", "o2"): "include",
        ("Provenance", "prov1"): "include",
    }
    assert bundle["total"] == 1  # includes do not count
    assert all(e["fullUrl"] == f"http://testserver/fhir/{t}/{i}" for (t, i), e in zip(modes, bundle["entry"]))
    subj = client.get("/fhir/Observation?_include=Observation:subject&_id=o1").json()
    assert {(e["resource"]["id"], e["search"]["mode"]) for e in subj["entry"]} == {("o1", "match"), ("p1", "include")}
    typed = client.get("/fhir/Observation?_id=o1&_include=Observation:derived-from:Media").json()
    assert [e["resource"]["id"] for e in typed["entry"]] == ["o1"]
    star = client.get("/fhir/Observation?_id=o1&_include=Observation:*").json()
    assert {e["resource"]["id"] for e in star["entry"]} == {"o1", "p1", "d1", "s1"}


def test_unknown_parameters_lenient_and_strict(client, data):
    r = client.get("/fhir/Patient?gender=male&foo=bar")
    bundle = r.json()
    assert r.status_code == 200 and bundle["total"] == 1
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert "foo" not in self_link and "gender=male" in self_link  # the self link shows what was applied
    outcome = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome and "foo" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    r = client.get("/fhir/Patient?gender=male&foo=bar", headers={"Prefer": "handling=strict"})
    assert r.status_code == 400 and "foo" in outcome_of(r)["issue"][0]["diagnostics"]
    assert client.get("/fhir/Patient?gender=male", headers={"Prefer": "handling=strict"}).status_code == 200
    # bad values and unknown modifiers are errors whatever the handling
    assert client.get("/fhir/Patient?birthdate=1970-13-01").status_code == 400
    assert client.get("/fhir/Patient?gender:fuzzy=male").status_code == 400
    assert client.get("/fhir/Observation?value-quantity=gtabc").status_code == 400
    assert client.get("/fhir/Patient?_include=Observation:subject", headers={"Prefer": "handling=strict"}).status_code == 400


def test_post_search(client, data):
    r = client.post("/fhir/Observation/_search", data={"patient": "p1", "status": "preliminary"})
    assert r.status_code == 200 and [e["resource"]["id"] for e in r.json()["entry"]] == ["o1"]
    r = client.post("/fhir/Observation/_search?code=8186001", data={"status": "final"})
    assert [e["resource"]["id"] for e in r.json()["entry"]] == ["o2"]
    r = client.post("/fhir/Observation/_search", json={"patient": "p1"})
    assert r.status_code == 415


def test_search_does_not_see_old_versions_or_deleted(client, data, repo):
    repo.update("Patient", "p2", {**data["p2"].resource, "gender": "other"})
    assert ids(client, "/fhir/Patient?gender=male") == []
    assert ids(client, "/fhir/Patient?gender=other") == ["p2"]
    repo.delete("Patient", "p2")
    assert ids(client, "/fhir/Patient?gender=other") == []
    assert "p2" not in ids(client, "/fhir/Patient")
