"""Every resource the server returns in a realistic session passes independent FHIR R4 validators.

The session (in-process, TestClient; the tiny hand-wired test model, fresh SQLite): metadata,
Patient CRUD and history, Media with an inline generated chest-like PNG, $analyze at instance and
type level (and a re-analysis), DiagnosticReport search with _include/_revinclude, Observation
reads and searches, Device, Provenance, Binary, async $analyze with its Task, OperationDefinitions,
a transaction Bundle, ImagingStudy/Endpoint with $analyze over (mocked) DICOMweb, the error paths
(404, 410, 400, 406, 412, 415, 422...), on a second app with authentication on 401 and 403, and on
a third whose out-of-distribution gate refuses every image the 422 refusal.

Every JSON resource returned (Bundles, and each entry on its own) then goes through the three Node
validators (one node process) and the Python validators. Step expectations and validation are
separate tests, so a server bug in one step does not hide the validation results of the rest.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
from conformance_checks import (
    NODE_VALIDATORS,
    PYTHON_VALIDATORS,
    Report,
    chest_like_png,
    collect_resources,
    node_unavailable_reason,
    unique_resources,
    validate_resources,
)
from live_server import make_test_app, tiny_test_analyzer

FHIR_JSON = "application/fhir+json"


@dataclass
class Step:
    name: str
    method: str
    path: str
    status: int | None
    expected: tuple[int, ...]
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status in self.expected and not self.note


@dataclass
class Session:
    """Runs the requests, records what came back and every resource in it."""

    client: Any
    steps: list[Step] = field(default_factory=list)
    returned: list[dict[str, Any]] = field(default_factory=list)

    def call(self, name: str, method: str, path: str, expected: int | tuple[int, ...], **kwargs: Any) -> Any:
        headers = {"Accept": FHIR_JSON, **kwargs.pop("headers", {})}
        if "json" in kwargs:
            kwargs["content"] = json.dumps(kwargs.pop("json"))
            headers.setdefault("Content-Type", FHIR_JSON)
        response = self.client.request(method, path, headers=headers, **kwargs)
        expected = (expected,) if isinstance(expected, int) else expected
        step = Step(name, method, path, response.status_code, expected)
        self.steps.append(step)
        ctype = response.headers.get("content-type", "")
        if response.content and "json" in ctype:
            try:
                body = response.json()
            except ValueError:
                step.note = "response is not valid JSON"
                return response
            if isinstance(body, dict) and "resourceType" in body:
                self.returned.extend(collect_resources(body))
            elif path.startswith("/fhir"):
                step.note = f"FHIR response without a resourceType: {str(body)[:200]}"
            if "fhir+json" not in ctype and path.startswith("/fhir"):
                step.note = f"Content-Type {ctype!r} is not application/fhir+json"
        if response.status_code >= 400 and path.startswith("/fhir"):
            body = _json(response)
            if body.get("resourceType") != "OperationOutcome":
                step.note = f"error {response.status_code} without an OperationOutcome"
        if response.status_code not in expected:
            step.note = step.note or f"body: {response.text[:300]}"
        return response

    def check(self, name: str, condition: bool, note: str) -> None:
        """A non-HTTP expectation, recorded like a step."""
        self.steps.append(Step(name, "CHECK", "", 0 if condition else None, (0,), "" if condition else note))


def _json(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _entries(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e.get("resource", {}).get("resourceType") == resource_type]


def _media(patient_id: str, png: bytes) -> dict[str, Any]:
    return {
        "resourceType": "Media",
        "status": "completed",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image"}]},
        "modality": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}]},
        "view": {"coding": [{"system": "http://snomed.info/sct", "code": "399348003", "display": "Anteroposterior"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "createdDateTime": "2026-11-25T09:30:00Z",
        "bodySite": {"coding": [{"system": "http://snomed.info/sct", "code": "51185008", "display": "Thoracic structure"}]},
        "content": {"contentType": "image/png", "data": base64.b64encode(png).decode(), "title": "chest.png"},
    }


def run_session(client: Any) -> Session:
    s = Session(client)
    png = chest_like_png()

    # -- capabilities
    cap = _json(s.call("metadata", "GET", "/fhir/metadata", 200))
    s.check("metadata fhirVersion", cap.get("fhirVersion") == "4.0.1", f"fhirVersion {cap.get('fhirVersion')!r}")
    s.call("metadata with _format", "GET", "/fhir/metadata?_format=json", 200)

    # -- Patient CRUD, vread, history
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "CXR-CONF-1"}],
               "name": [{"family": "Conformance", "given": ["Chesty"]}], "gender": "female", "birthDate": "1961-04-02"}
    created = s.call("create Patient", "POST", "/fhir/Patient", 201, json=patient)
    pid = _json(created).get("id", "missing")
    s.check("Location header", f"/fhir/Patient/{pid}/_history/1" in created.headers.get("location", ""),
            f"Location {created.headers.get('location')!r}")
    s.call("conditional create (exists)", "POST", "/fhir/Patient", 200, json=patient,
           headers={"If-None-Exist": "identifier=urn:oid:1.2.36.146.595.217.0.1|CXR-CONF-1"})
    s.call("read Patient", "GET", f"/fhir/Patient/{pid}", 200)
    s.call("update Patient", "PUT", f"/fhir/Patient/{pid}", 200, json={**patient, "id": pid, "gender": "other"},
           headers={"If-Match": 'W/"1"'})
    s.call("update with stale If-Match", "PUT", f"/fhir/Patient/{pid}", 412, json={**patient, "id": pid},
           headers={"If-Match": 'W/"1"'})
    s.call("vread Patient", "GET", f"/fhir/Patient/{pid}/_history/1", 200)
    s.call("Patient history", "GET", f"/fhir/Patient/{pid}/_history", 200)
    s.call("Patient search", "GET", "/fhir/Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|CXR-CONF-1", 200)
    s.call("Prefer return=OperationOutcome", "POST", "/fhir/Patient", 201,
           json={"resourceType": "Patient", "name": [{"family": "Other"}]}, headers={"Prefer": "return=OperationOutcome"})

    # -- Media with an inline image, then $analyze at instance level (and again: a re-analysis)
    media = _json(s.call("create Media", "POST", "/fhir/Media", 201, json=_media(pid, png)))
    mid = media.get("id", "missing")
    s.call("Media search", "GET", f"/fhir/Media?patient=Patient/{pid}&modality=DX", 200)
    result = _json(s.call("$analyze Media instance", "POST", f"/fhir/Media/{mid}/$analyze", 201))
    s.check("$analyze returns a Bundle", result.get("resourceType") == "Bundle", f"got {result.get('resourceType')}")
    reports = _entries(result, "DiagnosticReport")
    report_id = reports[0]["id"] if reports else "missing"
    observation_ids = [o["id"] for o in _entries(result, "Observation")]
    s.check("$analyze gives Observations", bool(observation_ids), "no Observation in the result Bundle")
    device_ids = [d["id"] for d in _entries(result, "Device")]
    binary_ids = [b["id"] for b in _entries(result, "Binary")]
    s.call("$analyze Media instance again (re-analysis)", "POST", f"/fhir/Media/{mid}/$analyze", 200,
           json={"resourceType": "Parameters", "parameter": [{"name": "heatmaps", "valueBoolean": False}]})

    # -- $analyze at type level with the Media inline in Parameters
    inline = _media(pid, chest_like_png(opacity=False))
    inline["identifier"] = [{"system": "urn:dicom:uid", "value": "urn:oid:2.25.1234567890"}]
    s.call("$analyze Media type level", "POST", "/fhir/Media/$analyze", 201,
           json={"resourceType": "Parameters", "parameter": [{"name": "media", "resource": inline},
                                                             {"name": "heatmaps", "valueBoolean": True}]})

    # -- searches over the results
    s.call("DiagnosticReport search _include", "GET",
           f"/fhir/DiagnosticReport?patient=Patient/{pid}&_include=DiagnosticReport:result", 200)
    s.call("DiagnosticReport search _revinclude", "GET",
           f"/fhir/DiagnosticReport?subject=Patient/{pid}&_revinclude=Provenance:target&status=preliminary", 200)
    s.call("DiagnosticReport search by code", "GET", "/fhir/DiagnosticReport?code=http://loinc.org|36554-4&_sort=-date", 200)
    s.call("DiagnosticReport _summary=count", "GET", f"/fhir/DiagnosticReport?patient={pid}&_summary=count", 200)
    s.call("DiagnosticReport POST _search", "POST", "/fhir/DiagnosticReport/_search", 200,
           content=f"patient=Patient/{pid}", headers={"Content-Type": "application/x-www-form-urlencoded"})
    page = _json(s.call("Observation search paged", "GET", f"/fhir/Observation?patient=Patient/{pid}&_count=2", 200))
    next_links = [link["url"] for link in page.get("link", []) if link.get("relation") == "next"]
    if next_links:
        link = urlsplit(next_links[0])
        s.call("Observation next page", "GET", f"{link.path}?{link.query}", 200)
    s.call("Observation search derived-from", "GET", f"/fhir/Observation?derived-from=Media/{mid}&category=imaging", 200)
    for oid in observation_ids[:3]:
        s.call("read Observation", "GET", f"/fhir/Observation/{oid}", 200)
    s.call("read DiagnosticReport", "GET", f"/fhir/DiagnosticReport/{report_id}", 200)
    s.call("DiagnosticReport history", "GET", f"/fhir/DiagnosticReport/{report_id}/_history", 200)
    s.call("DiagnosticReport vread 1", "GET", f"/fhir/DiagnosticReport/{report_id}/_history/1", 200)
    s.call("Observation type history", "GET", "/fhir/Observation/_history?_count=5", 200)
    for dev in device_ids[:1]:
        s.call("read Device", "GET", f"/fhir/Device/{dev}", 200)
    s.call("Device search", "GET", "/fhir/Device", 200)
    s.call("Provenance search", "GET", f"/fhir/Provenance?target=DiagnosticReport/{report_id}", 200)
    for bid in binary_ids[:1]:
        s.call("read Binary as FHIR JSON", "GET", f"/fhir/Binary/{bid}", 200)

    # -- async $analyze with its Task
    accepted = s.call("$analyze async", "POST", f"/fhir/Media/{mid}/$analyze", 202, headers={"Prefer": "respond-async"})
    poll = accepted.headers.get("content-location", "")
    s.check("async Content-Location", "/_async/" in poll, f"Content-Location {poll!r}")
    if "/_async/" in poll:
        path = "/fhir/_async/" + poll.rsplit("/_async/", 1)[1]
        deadline = time.monotonic() + 60
        while True:
            response = client.get(path, headers={"Accept": FHIR_JSON})
            if response.status_code != 202 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        s.call("async poll result", "GET", path, 200)
        job = path.rsplit("/", 1)[1]
        task = _json(s.call("read Task", "GET", f"/fhir/Task/{job}", 200))
        s.check("Task completed", task.get("status") == "completed", f"Task status {task.get('status')!r}")
        s.call("Task search", "GET", "/fhir/Task?status=completed", 200)

    # -- OperationDefinitions
    for op in ("Media-analyze", "ImagingStudy-analyze"):
        s.call(f"read OperationDefinition {op}", "GET", f"/fhir/OperationDefinition/{op}", 200)

    # -- ImagingStudy and Endpoint (stored only; the DICOMweb path is tested elsewhere with respx)
    endpoint = {"resourceType": "Endpoint", "status": "active",
                "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM"}], "address": "https://pacs.example.org/dicomweb"}
    eid = _json(s.call("create Endpoint", "POST", "/fhir/Endpoint", 201, json=endpoint)).get("id", "missing")
    study = {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": f"Patient/{pid}"},
             "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:2.25.99887766"}],
             "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}],
             "endpoint": [{"reference": f"Endpoint/{eid}"}], "started": "2026-11-25T09:00:00Z"}
    s.call("create ImagingStudy", "POST", "/fhir/ImagingStudy", 201, json=study,
           headers={"If-None-Exist": "identifier=urn:dicom:uid|urn:oid:2.25.99887766"})
    s.call("ImagingStudy search", "GET", f"/fhir/ImagingStudy?patient=Patient/{pid}&modality=DX", 200)
    _imaging_study_session(s, pid)

    # -- transaction Bundle with urn:uuid references
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:7f3a3c4e-8d2b-4f0e-9a61-3f7b2c1d0e11",
         "resource": {"resourceType": "Patient", "name": [{"family": "Transaction"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {**_media("x", png), "subject": {"reference": "urn:uuid:7f3a3c4e-8d2b-4f0e-9a61-3f7b2c1d0e11"}},
         "request": {"method": "POST", "url": "Media"}},
    ]}
    s.call("transaction", "POST", "/fhir", 200, json=tx)
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{pid}"}},
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
    ]}
    s.call("batch", "POST", "/fhir", 200, json=batch)

    # -- errors: each must be an OperationOutcome with the right status
    s.call("read unknown id", "GET", "/fhir/Patient/does-not-exist", 404)
    s.call("unknown resource type", "GET", "/fhir/Foo/1", (400, 404))
    s.call("invalid status code", "POST", "/fhir/Observation", (400, 422),
           json={"resourceType": "Observation", "status": "bogus", "code": {"text": "x"}})
    s.call("unknown element", "POST", "/fhir/Patient", (400, 422), json={"resourceType": "Patient", "foo": 1})
    s.call("malformed JSON", "POST", "/fhir/Patient", 400, content="{not json",
           headers={"Content-Type": FHIR_JSON})
    s.call("unsupported _format", "GET", "/fhir/metadata?_format=text/turtle", 406)
    s.call("unsupported body type", "POST", "/fhir/Patient", 415, content="<Patient/>",
           headers={"Content-Type": "application/fhir+xml"})
    s.call("bad search parameter", "GET", "/fhir/DiagnosticReport?date=notadate", 400)
    s.call("$analyze without input", "POST", "/fhir/Media/$analyze", 400,
           json={"resourceType": "Parameters", "parameter": []})
    s.call("$analyze image that is not an image", "POST", "/fhir/Media/$analyze", (400, 415, 422),
           json={"resourceType": "Parameters", "parameter": [{"name": "media", "resource": {
               **_media(pid, b"definitely not an image")}}]})
    s.call("delete Patient", "DELETE", f"/fhir/Patient/{pid}", (200, 204))
    s.call("read deleted", "GET", f"/fhir/Patient/{pid}", 410)
    return s


def _imaging_study_session(s: Session, pid: str) -> None:
    """$analyze of an ImagingStudy whose images come over DICOMweb (QIDO-RS + WADO-RS, mocked with
    respx from realistic payloads): PA + lateral, so a study-level report."""
    import respx
    from dicomweb_fixtures import endpoint, imaging_study, make_instance, mock_study

    study_uid = "1.2.826.0.1.3680043.8.498.4242"
    s.call("create PACS Endpoint", "PUT", "/fhir/Endpoint/conformance-pacs", (200, 201), json=endpoint("conformance-pacs"))
    study = _json(s.call("create DICOMweb ImagingStudy", "POST", "/fhir/ImagingStudy", 201,
                         json=imaging_study(study_uid, "Endpoint/conformance-pacs", f"Patient/{pid}")))
    pa = make_instance(study_uid, f"{study_uid}.1", f"{study_uid}.1.1", view="PA")
    lateral = make_instance(study_uid, f"{study_uid}.2", f"{study_uid}.2.1", view="LL", quadrant="all")
    with respx.mock:
        mock_study(study_uid, [pa, lateral])
        s.call("$analyze ImagingStudy instance (DICOMweb)", "POST", f"/fhir/ImagingStudy/{study.get('id')}/$analyze", 201)
    s.call("DiagnosticReport for the study", "GET", f"/fhir/DiagnosticReport?patient=Patient/{pid}&_include=DiagnosticReport:result&_revinclude=Provenance:target", 200)


def run_auth_session(client: Any) -> Session:
    """With authentication on: metadata stays open, a missing/unknown token is a 401 with
    WWW-Authenticate, a token without the scope a 403, each an OperationOutcome."""
    s = Session(client)
    s.call("metadata (open, auth on)", "GET", "/fhir/metadata", 200)
    missing = s.call("no token", "GET", "/fhir/Patient", 401)
    s.check("WWW-Authenticate", missing.headers.get("www-authenticate", "").startswith("Bearer"),
            f"WWW-Authenticate {missing.headers.get('www-authenticate')!r}")
    s.call("unknown token", "GET", "/fhir/Patient", 401, headers={"Authorization": "Bearer nope"})
    s.call("read-only token searches", "GET", "/fhir/Patient", 200, headers={"Authorization": "Bearer reader"})
    s.call("read-only token creates", "POST", "/fhir/Patient", 403, json={"resourceType": "Patient"},
           headers={"Authorization": "Bearer reader"})
    s.call("read-only token runs $analyze", "POST", "/fhir/Media/$analyze", 403,
           json={"resourceType": "Parameters", "parameter": []}, headers={"Authorization": "Bearer reader"})
    return s


def run_refusal_session(client: Any) -> Session:
    """An out-of-distribution gate that refuses the image: 422 OperationOutcome, nothing stored."""
    s = Session(client)
    pid = _json(s.call("create Patient (gate)", "POST", "/fhir/Patient", 201, json={"resourceType": "Patient"})).get("id")
    refused = _json(s.call("$analyze refused by the OOD gate", "POST", "/fhir/Media/$analyze", 422,
                           json={"resourceType": "Parameters", "parameter": [
                               {"name": "media", "resource": _media(str(pid), chest_like_png())}]}))
    s.check("refusal says why", "frontal chest" in json.dumps(refused), f"outcome {refused}")
    count = _json(s.call("no report after a refusal", "GET", "/fhir/DiagnosticReport?_summary=count", 200))
    s.check("nothing stored after a refusal", count.get("total") == 0, f"total {count.get('total')!r}")
    return s


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    from fastapi.testclient import TestClient

    analyzer = tiny_test_analyzer()
    from analyze_support import HOST, fake_resolve

    app = make_test_app(tmp_path_factory.mktemp("cxr-conformance"), analyzer=analyzer, fetch_allowed_hosts=[HOST])
    app.state.fetch_policy_overrides = {"resolver": fake_resolve}  # the mocked PACS host never hits DNS
    secured = make_test_app(tmp_path_factory.mktemp("cxr-conformance-auth"), analyzer=analyzer, auth_enabled=True,
                            auth_dev_static_tokens=True, auth_tokens={"reader": "system/*.rs"})
    refusing_analyzer = _refusing_analyzer()
    refusing = make_test_app(tmp_path_factory.mktemp("cxr-conformance-ood"), analyzer=refusing_analyzer)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            result = run_session(client)
        with TestClient(secured, raise_server_exceptions=False) as client:
            auth = run_auth_session(client)
        with TestClient(refusing, raise_server_exceptions=False) as client:
            refusal = run_refusal_session(client)
        for extra in (auth, refusal):
            result.steps += extra.steps
            result.returned += extra.returned
        yield result
    finally:
        for owned in (analyzer, refusing_analyzer):
            if owned is not None:
                owned.close()


def _refusing_analyzer() -> Any:
    from model_fixtures import RefusingGate, tiny_analyzer

    return tiny_analyzer(ood_gate=RefusingGate())


@pytest.fixture(scope="module")
def returned(session: Session) -> list[dict[str, Any]]:
    resources = unique_resources(session.returned)
    counts = Counter(r["resourceType"] for r in resources)
    print(f"\n{len(resources)} distinct resources returned by the server: {dict(sorted(counts.items()))}")
    return resources


def test_session_steps_behave_as_fhir_specifies(session: Session) -> None:
    failed = [s for s in session.steps if not s.ok]
    lines = [f"{s.name}: {s.method} {s.path} -> {s.status} (expected {s.expected}) {s.note}" for s in failed]
    print(f"\n{len(session.steps) - len(failed)}/{len(session.steps)} steps as expected")
    assert not failed, "\n".join(lines)


def test_session_covers_the_resource_types(returned: list[dict[str, Any]]) -> None:
    types = {r["resourceType"] for r in returned}
    wanted = {"Binary", "Bundle", "CapabilityStatement", "Device", "DiagnosticReport", "Endpoint", "ImagingStudy",
              "Media", "Observation", "OperationDefinition", "OperationOutcome", "Patient", "Provenance", "Task"}
    assert wanted <= types, f"never returned: {sorted(wanted - types)}"


def _assert_clean(report: Report, validators: tuple[str, ...]) -> None:
    print("\n" + report.summary())
    assert not report.problems, report.summary()
    for validator in validators:
        assert report.checked[validator] == report.resources, f"{validator} did not check every resource"


@pytest.mark.skipif(node_unavailable_reason() is not None, reason=str(node_unavailable_reason()))
def test_every_returned_resource_passes_the_node_validators(returned: list[dict[str, Any]]) -> None:
    _assert_clean(validate_resources(returned, python=()), NODE_VALIDATORS)


def test_every_returned_resource_passes_the_python_validators(returned: list[dict[str, Any]]) -> None:
    _assert_clean(validate_resources(returned, node=False), PYTHON_VALIDATORS)
