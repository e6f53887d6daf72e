"""_summary (true | text | data | false | count) and _elements on read, vread, search, history and
batch GET (R4 search.html#summary, #elements), over HTTP on every available database.

The expected element sets are written out from the R4 resource definitions (the Σ flags and
min >= 1), not derived from the code under test."""

from __future__ import annotations

import base64
import copy

import pytest
from fhir_support import outcome_of

from fhir_server.fhir.subsetting import subset_resource

pytest_plugins = ["fhir_support"]  # the repo / client fixtures (SQLite + PostgreSQL)

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
AIAST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST"}
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
NARRATIVE = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">narrative</div>'}
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()

PATIENT = {
    "resourceType": "Patient",
    "text": NARRATIVE,
    "identifier": [{"system": "urn:mrn", "value": "MRN-S1"}],
    "active": True,
    "name": [{"family": "Doe", "given": ["Jane"]}],
    "gender": "female",
    "birthDate": "1970-03-04",
    "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1970-03-04T10:00:00Z"}]},
    "maritalStatus": {"text": "married"},
    "communication": [{"language": {"text": "English"}}],
}

MEDIA = {
    "resourceType": "Media",
    "text": NARRATIVE,
    "status": "completed",
    "modality": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}]},
    "view": {"coding": [{"system": SCT, "code": "399348003"}]},
    "createdDateTime": "2024-05-06T10:00:00Z",
    "height": 16,
    "width": 16,
    "content": {"contentType": "image/png", "data": PNG_B64, "title": "heatmap"},
    "note": [{"text": "Grad-CAM heatmap"}],
}


def observation(subject: str, media: str) -> dict:
    return {
        "resourceType": "Observation",
        "meta": {"security": [AIAST], "tag": [{"system": "urn:cxr:test", "code": "keep-me"}]},
        "text": NARRATIVE,
        "extension": [{"url": "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AIconfidence", "valueDecimal": 0.82}],
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]}],
        "code": {"coding": [{"system": SCT, "code": "233604007"}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2024-03-01T10:05:00Z",
        "valueQuantity": {"value": 0.82, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1"},
        "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "POS"}]}],
        "bodySite": {"coding": [{"system": SCT, "code": "39607008"}]},
        "note": [{"text": "AI output, not a diagnosis"}],
        "derivedFrom": [{"reference": media}],
    }


def report(subject: str, obs: str, media: str) -> dict:
    return {
        "resourceType": "DiagnosticReport",
        "text": NARRATIVE,
        "identifier": [{"system": "urn:cxr:report", "value": "R-S1"}],
        "status": "preliminary",
        "category": [{"coding": [{"system": LOINC, "code": "LP29684-5"}]}],
        "code": {"coding": [{"system": LOINC, "code": "36554-4"}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2024-03-01",
        "issued": "2024-03-01T10:06:00Z",
        "result": [{"reference": obs}],
        "media": [{"link": {"reference": media}}],
        "conclusion": "Pneumonia likely",
        "conclusionCode": [{"coding": [{"system": SCT, "code": "233604007"}]}],
    }


@pytest.fixture
def stored(client):
    """One Patient, Media, Observation and DiagnosticReport, as the server returned them on create."""
    out = {}
    out["Patient"] = client.post("/fhir/Patient", json=PATIENT).json()
    patient_ref = f"Patient/{out['Patient']['id']}"
    out["Media"] = client.post("/fhir/Media", json={**MEDIA, "subject": {"reference": patient_ref}}).json()
    media_ref = f"Media/{out['Media']['id']}"
    out["Observation"] = client.post("/fhir/Observation", json=observation(patient_ref, media_ref)).json()
    obs_ref = f"Observation/{out['Observation']['id']}"
    out["DiagnosticReport"] = client.post("/fhir/DiagnosticReport", json=report(patient_ref, obs_ref, media_ref)).json()
    for resource in out.values():
        assert resource.get("id"), resource
    return out


ALWAYS = {"resourceType", "id", "meta"}

# the elements of the fixtures above that each mode keeps
SUMMARY_TRUE = {
    "Patient": ALWAYS | {"identifier", "active", "name", "gender", "birthDate", "_birthDate"},
    "Observation": ALWAYS | {"status", "code", "subject", "effectiveDateTime", "valueQuantity", "derivedFrom"},
    "DiagnosticReport": ALWAYS | {"identifier", "status", "category", "code", "subject", "effectiveDateTime", "issued", "media"},
    "Media": ALWAYS | {"status", "subject", "modality", "view", "createdDateTime", "height", "width", "content"},
}
SUMMARY_TEXT = {
    "Patient": ALWAYS | {"text"},
    "Observation": ALWAYS | {"text", "status", "code"},
    "DiagnosticReport": ALWAYS | {"text", "status", "code"},
    "Media": ALWAYS | {"text", "status", "content"},
}


def get_ok(client, url: str) -> dict:
    r = client.get(url)
    assert r.status_code == 200, r.text
    return r.json()


def tags(resource: dict) -> list[dict]:
    return resource.get("meta", {}).get("tag", [])


def is_subsetted(resource: dict) -> bool:
    return any({k: t.get(k) for k in ("system", "code")} == SUBSETTED for t in tags(resource))


@pytest.mark.parametrize("rtype", ["Patient", "Observation", "DiagnosticReport", "Media"])
def test_summary_modes_on_read(client, stored, rtype):
    full = stored[rtype]
    url = f"/fhir/{rtype}/{full['id']}"

    summary = get_ok(client, f"{url}?_summary=true")
    assert set(summary) == SUMMARY_TRUE[rtype]
    assert is_subsetted(summary)
    for key in SUMMARY_TRUE[rtype] - {"meta", "content"}:
        assert summary[key] == full[key], key  # kept elements are whole

    text = get_ok(client, f"{url}?_summary=text")
    assert set(text) == SUMMARY_TEXT[rtype]
    assert text["text"] == NARRATIVE and is_subsetted(text)

    data = get_ok(client, f"{url}?_summary=data")
    assert set(data) == set(full) - {"text"}
    assert is_subsetted(data)
    assert {k: v for k, v in data.items() if k != "meta"} == {k: v for k, v in full.items() if k not in ("meta", "text")}

    assert get_ok(client, f"{url}?_summary=false") == full
    assert get_ok(client, url) == full  # nothing was stored


def test_summary_leaves_out_attachment_data_only(client, stored):
    media = stored["Media"]
    for mode in ("true", "text"):
        content = get_ok(client, f"/fhir/Media/{media['id']}?_summary={mode}")["content"]
        assert content == {"contentType": "image/png", "title": "heatmap"}
    assert get_ok(client, f"/fhir/Media/{media['id']}?_summary=data")["content"]["data"] == PNG_B64
    assert get_ok(client, f"/fhir/Media/{media['id']}?_elements=content")["content"]["data"] == PNG_B64


def test_subsetted_tag_is_added_to_existing_meta(client, stored):
    full = stored["Observation"]
    summary = get_ok(client, f"/fhir/Observation/{full['id']}?_summary=true")
    assert summary["meta"]["tag"] == [{"system": "urn:cxr:test", "code": "keep-me"}, SUBSETTED]
    assert summary["meta"]["security"] == [AIAST]
    assert summary["meta"]["versionId"] == full["meta"]["versionId"]
    assert summary["meta"]["lastUpdated"] == full["meta"]["lastUpdated"]


def test_subsetted_tag_only_when_something_was_left_out(client):
    bare = client.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Roe"}], "gender": "male"}).json()
    url = f"/fhir/Patient/{bare['id']}"
    for query in ("_summary=true", "_summary=data", "_summary=false", "_elements=name,gender"):
        assert get_ok(client, f"{url}?{query}") == bare, query
    reduced = get_ok(client, f"{url}?_elements=gender")
    assert set(reduced) == ALWAYS | {"gender"} and is_subsetted(reduced)


def test_elements(client, stored):
    obs = stored["Observation"]
    url = f"/fhir/Observation/{obs['id']}"
    picked = get_ok(client, f"{url}?_elements=interpretation,note")
    # status and code are mandatory (min 1): always returned
    assert set(picked) == ALWAYS | {"status", "code", "interpretation", "note"}
    assert picked["interpretation"] == obs["interpretation"] and is_subsetted(picked)
    # a choice element by its base name, its [x] name or its JSON name
    for name in ("value", "value[x]", "valueQuantity"):
        assert set(get_ok(client, f"{url}?_elements={name}")) == ALWAYS | {"status", "code", "valueQuantity"}, name
    # unknown and nested names are ignored, not an error
    assert set(get_ok(client, f"{url}?_elements=bogus,code.coding,subject")) == ALWAYS | {"status", "code", "subject"}
    # several _elements parameters add up
    assert set(get_ok(client, f"{url}?_elements=subject&_elements=bodySite")) == ALWAYS | {"status", "code", "subject", "bodySite"}
    patient = stored["Patient"]
    assert set(get_ok(client, f"/fhir/Patient/{patient['id']}?_elements=name")) == ALWAYS | {"name"}
    assert get_ok(client, url) == obs


def test_vread(client, stored):
    patient = stored["Patient"]
    client.put(f"/fhir/Patient/{patient['id']}", json={**patient, "gender": "other"})
    v1 = get_ok(client, f"/fhir/Patient/{patient['id']}/_history/1?_summary=text")
    assert set(v1) == SUMMARY_TEXT["Patient"] and v1["meta"]["versionId"] == "1" and is_subsetted(v1)
    v2 = get_ok(client, f"/fhir/Patient/{patient['id']}/_history/2?_elements=gender")
    assert set(v2) == ALWAYS | {"gender"} and v2["gender"] == "other"
    assert "tag" not in get_ok(client, f"/fhir/Patient/{patient['id']}/_history/1").get("meta", {})


def test_stored_resource_untouched(client, repo, stored):
    for rtype, full in stored.items():
        for query in ("_summary=true", "_summary=text", "_summary=data", "_elements=id"):
            get_ok(client, f"/fhir/{rtype}/{full['id']}?{query}")
            get_ok(client, f"/fhir/{rtype}?_id={full['id']}&{query}")
        assert get_ok(client, f"/fhir/{rtype}/{full['id']}") == full
        assert repo.read(rtype, full["id"]).resource == full
        history = get_ok(client, f"/fhir/{rtype}/{full['id']}/_history")
        assert history["total"] == 1 and not is_subsetted(history["entry"][0]["resource"])


def test_pure_function_does_not_change_its_input():
    resource = {**copy.deepcopy(MEDIA), "id": "m1", "meta": {"versionId": "1", "tag": [{"code": "x"}]}}
    before = copy.deepcopy(resource)
    for mode in ("true", "text", "data"):
        assert is_subsetted(subset_resource(resource, summary=mode))
    assert is_subsetted(subset_resource(resource, elements=["note"]))
    assert resource == before
    assert subset_resource(resource, summary="false") == before
    # resources the models do not know (and unknown element names) pass through
    assert subset_resource({"resourceType": "Nope", "x": 1}, summary="true") == {"resourceType": "Nope", "x": 1}


def entries(bundle: dict, mode: str) -> list[dict]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def test_search_entries_are_subsetted(client, stored):
    dr = stored["DiagnosticReport"]
    bundle = get_ok(client, f"/fhir/DiagnosticReport?_id={dr['id']}&_summary=true&_include=DiagnosticReport:result")
    (match,) = entries(bundle, "match")
    assert set(match) == SUMMARY_TRUE["DiagnosticReport"] and is_subsetted(match)
    (included,) = entries(bundle, "include")  # _summary covers included resources too
    assert set(included) == SUMMARY_TRUE["Observation"] and is_subsetted(included)
    assert not is_subsetted(bundle)  # the Bundle itself is complete

    bundle = get_ok(client, f"/fhir/DiagnosticReport?_id={dr['id']}&_elements=conclusion&_include=DiagnosticReport:result")
    (match,) = entries(bundle, "match")
    assert set(match) == ALWAYS | {"status", "code", "conclusion"} and is_subsetted(match)
    (included,) = entries(bundle, "include")  # _elements is for the matches only
    assert included == stored["Observation"]
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert "_elements=conclusion" in self_link

    r = client.post("/fhir/Media/_search", data={"_id": stored["Media"]["id"], "_summary": "text"})
    assert r.status_code == 200, r.text
    (match,) = entries(r.json(), "match")
    assert set(match) == SUMMARY_TEXT["Media"] and "data" not in match["content"]

    plain = get_ok(client, f"/fhir/Observation?_id={stored['Observation']['id']}&_summary=false")
    assert entries(plain, "match") == [stored["Observation"]]


def test_search_summary_count_and_lenient_outcome_untouched(client, stored):
    counted = get_ok(client, "/fhir/Observation?_summary=count")
    assert counted["total"] == 1 and "entry" not in counted
    counted = get_ok(client, "/fhir/Observation?_summary=count&_elements=status")
    assert counted["total"] == 1 and "entry" not in counted
    bundle = get_ok(client, "/fhir/Observation?_summary=true&not-a-param=1")
    (outcome,) = entries(bundle, "outcome")
    assert outcome["resourceType"] == "OperationOutcome" and not is_subsetted(outcome)


def test_history(client, stored):
    patient = stored["Patient"]
    client.put(f"/fhir/Patient/{patient['id']}", json={**patient, "gender": "other"})
    bundle = get_ok(client, f"/fhir/Patient/{patient['id']}/_history?_summary=text")
    assert bundle["total"] == 2
    for entry in bundle["entry"]:
        assert set(entry["resource"]) == SUMMARY_TEXT["Patient"] and is_subsetted(entry["resource"])
    bundle = get_ok(client, "/fhir/Patient/_history?_elements=gender")
    assert {entry["resource"]["gender"] for entry in bundle["entry"]} == {"female", "other"}
    assert all(set(e["resource"]) == ALWAYS | {"gender"} for e in bundle["entry"])
    counted = get_ok(client, "/fhir/_history?_summary=count")
    assert counted["total"] == 5 and "entry" not in counted


def test_batch_get_entries(client, stored):
    patient = stored["Patient"]
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient/{patient['id']}?_summary=text"}},
            {"request": {"method": "GET", "url": f"Patient?_id={patient['id']}&_elements=gender"}},
            {"request": {"method": "GET", "url": f"Patient/{patient['id']}?_summary=bogus"}},
        ],
    }
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    read, search, bad = r.json()["entry"]
    assert set(read["resource"]) == SUMMARY_TEXT["Patient"] and is_subsetted(read["resource"])
    (match,) = entries(search["resource"], "match")
    assert set(match) == ALWAYS | {"gender"}
    assert bad["response"]["status"].startswith("400")


@pytest.mark.parametrize(
    "url",
    [
        "/fhir/Patient/{id}?_summary=bogus",
        "/fhir/Patient/{id}?_summary=count",  # count is for search and history only
        "/fhir/Patient/{id}/_history/1?_summary=TRUE",
        "/fhir/Patient/{id}?_summary=true&_elements=name",
        "/fhir/Patient?_summary=bogus",
        "/fhir/Patient?_summary=data&_elements=name",
        "/fhir/Patient/_history?_summary=nope",
        "/fhir/Patient/{id}/_history?_summary=text&_elements=name",
    ],
)
def test_invalid_parameters_are_400_operation_outcomes(client, stored, url):
    r = client.get(url.format(id=stored["Patient"]["id"]))
    assert r.status_code == 400, r.text
    issue = outcome_of(r)["issue"][0]
    assert issue["severity"] == "error" and issue["code"] == "invalid"
    assert "_summary" in issue["diagnostics"]


def test_summary_false_or_count_combine_with_elements(client, stored):
    patient = stored["Patient"]
    picked = get_ok(client, f"/fhir/Patient/{patient['id']}?_summary=false&_elements=name")
    assert set(picked) == ALWAYS | {"name"}
    r = client.post("/fhir/Patient/_search", data={"_summary": "true", "_elements": "name"})
    assert r.status_code == 400 and outcome_of(r)["issue"][0]["code"] == "invalid"


def test_subsetted_resources_still_validate(client, stored):
    """The reduced views stay valid R4 (mandatory elements kept): the project's own model check
    plus two independent R4 validators that run in-process (cheap; no Node)."""
    from conformance_checks import validate_resources

    from fhir_server.fhir.validation import validate_resource

    views = []
    for rtype, full in stored.items():
        for query in ("_summary=true", "_summary=text", "_summary=data", "_elements=id"):
            views.append(get_ok(client, f"/fhir/{rtype}/{full['id']}?{query}"))
    for view in views:
        validate_resource(copy.deepcopy(view), expected_type=view["resourceType"])
    report = validate_resources(views, node=False, python=("fhirclient", "fhirkit"))
    assert not report.problems, report.summary()


def test_capability_statement_documents_result_parameters(client):
    documentation = client.get("/fhir/metadata").json()["rest"][0]["documentation"]
    assert "_summary" in documentation and "_elements" in documentation and "SUBSETTED" in documentation
