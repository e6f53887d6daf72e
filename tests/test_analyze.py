"""$analyze end to end through the app with the tiny test model: Media (stored, inline, bare),
ImagingStudy via DICOMweb (respx), one transaction, re-analysis versioning, errors."""

from __future__ import annotations

import httpx
import pytest
import respx
from analyze_support import by_type, make_client, media, outcome, png_b64, total
from dicomweb_fixtures import endpoint, imaging_study, make_instance, mock_instance, mock_study
from model_fixtures import RefusingGate, tiny_analyzer

SCT = "http://snomed.info/sct"
OUTPUT_TYPES = ("DiagnosticReport", "Observation", "Media", "Binary", "Device", "Provenance")


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def create(client, resource: dict) -> dict:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert response.status_code == 201, response.text
    return response.json()


def test_instance_level_media_analyze_writes_and_returns_everything(client) -> None:
    m = create(client, media())
    response = client.post(f"/fhir/Media/{m['id']}/$analyze")
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    kinds = by_type(bundle)
    report = kinds["DiagnosticReport"][0]
    assert bundle["entry"][0]["resource"]["resourceType"] == "DiagnosticReport"
    assert response.headers["location"].endswith(f"/fhir/DiagnosticReport/{report['id']}/_history/1")
    for entry in bundle["entry"]:
        r = entry["resource"]
        assert entry["fullUrl"].endswith(f"/fhir/{r['resourceType']}/{r['id']}")
        assert r["meta"]["versionId"] == "1"
    assert len(kinds["Observation"]) == 3 and len(kinds["Device"]) == 1 and len(kinds["Provenance"]) == 1
    assert kinds["Media"] and len(kinds["Media"]) == len(kinds["Binary"])  # heatmaps on by default
    assert report["status"] == "preliminary" and report["subject"] == {"reference": "Patient/p1"}
    assert {o["derivedFrom"][0]["reference"] for o in kinds["Observation"]} == {f"Media/{m['id']}"}
    pneumonia = next(o for o in kinds["Observation"] if (SCT, "233604007") in {(c["system"], c["code"]) for c in o["code"]["coding"]})
    assert pneumonia["interpretation"][0]["coding"][0]["code"] == "POS"
    prov = kinds["Provenance"][0]
    written = {f"{r['resourceType']}/{r['id']}/_history/1" for t in OUTPUT_TYPES[:4] for r in kinds.get(t, [])}
    assert {t["reference"] for t in prov["target"]} == written
    assert prov["entity"][0]["what"]["reference"] == f"Media/{m['id']}"
    # stored and findable like any resource
    assert client.get(f"/fhir/DiagnosticReport/{report['id']}").json()["id"] == report["id"]
    assert total(client, "DiagnosticReport?subject=Patient/p1") == 1
    assert total(client, f"Observation?derived-from=Media/{m['id']}") == 3
    binary_id = kinds["Media"][0]["content"]["url"].split("/")[1]
    assert client.get(f"/fhir/Binary/{binary_id}", headers={"Accept": "application/fhir+json"}).status_code == 200


def test_reanalysis_makes_new_versions_with_their_own_provenance(client) -> None:
    m = create(client, media())
    first = client.post(f"/fhir/Media/{m['id']}/$analyze").json()
    second = client.post(f"/fhir/Media/{m['id']}/$analyze")
    assert second.status_code == 200, second.text
    kinds1, kinds2 = by_type(first), by_type(second.json())
    r1, r2 = kinds1["DiagnosticReport"][0], kinds2["DiagnosticReport"][0]
    assert r1["id"] == r2["id"] and r2["meta"]["versionId"] == "2"
    assert second.headers["content-location"].endswith(f"/DiagnosticReport/{r2['id']}/_history/2")
    assert {o["id"] for o in kinds1["Observation"]} == {o["id"] for o in kinds2["Observation"]}
    assert all(o["meta"]["versionId"] == "2" for o in kinds2["Observation"])
    history = client.get(f"/fhir/DiagnosticReport/{r2['id']}/_history").json()
    assert history["total"] == 2
    assert client.get(f"/fhir/DiagnosticReport/{r2['id']}/_history/1").status_code == 200
    assert total(client, "Provenance") == 2
    prov2 = kinds2["Provenance"][0]
    assert f"DiagnosticReport/{r2['id']}/_history/2" in {t["reference"] for t in prov2["target"]}
    assert prov2["activity"]["coding"][0]["code"] == "UPDATE"
    assert total(client, "Device") == 1  # created once per model version
    assert kinds1["Device"][0]["id"] == kinds2["Device"][0]["id"] and kinds2["Device"][0]["meta"]["versionId"] == "1"


def test_type_level_parameters_with_inline_media_and_no_heatmaps(client) -> None:
    params = {
        "resourceType": "Parameters",
        "parameter": [{"name": "media", "resource": media()}, {"name": "heatmaps", "valueBoolean": False}],
    }
    response = client.post("/fhir/Media/$analyze", json=params, headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 201, response.text
    kinds = by_type(response.json())
    assert "Binary" not in kinds
    stored_input = kinds["Media"]  # the only Media is the stored input
    assert len(stored_input) == 1 and stored_input[0]["content"]["data"]
    ref = f"Media/{stored_input[0]['id']}"
    assert kinds["DiagnosticReport"][0]["media"] == [{"comment": "Analysed image", "link": {"reference": ref}}]
    assert client.get(f"/fhir/{ref}").status_code == 200


def test_type_level_accepts_a_bare_media_body(client) -> None:
    response = client.post("/fhir/Media/$analyze", json=media())
    assert response.status_code == 201, response.text
    assert by_type(response.json())["DiagnosticReport"]


def test_type_level_media_with_identifier_is_stored_once_and_versioned(client) -> None:
    ident = [{"system": "urn:example:media", "value": "xray-42"}]
    one = by_type(client.post("/fhir/Media/$analyze", json=media(identifier=ident)).json())
    again = client.post("/fhir/Media/$analyze", json=media(identifier=ident))
    assert again.status_code == 200
    assert total(client, "Media?identifier=urn:example:media|xray-42") == 1
    assert by_type(again.json())["DiagnosticReport"][0]["id"] == one["DiagnosticReport"][0]["id"]


def test_failed_provenance_write_leaves_nothing_stored(tmp_path, monkeypatch) -> None:
    from fhir_server.storage import Transaction

    original = Transaction.create

    def failing_create(self, resource, **kw):
        if resource.get("resourceType") == "Provenance":
            raise RuntimeError("disk full while writing the Provenance")
        return original(self, resource, **kw)

    with make_client(tmp_path, raise_server_exceptions=False) as client:
        m = create(client, media())
        monkeypatch.setattr(Transaction, "create", failing_create)
        response = client.post(f"/fhir/Media/{m['id']}/$analyze")
        assert response.status_code == 500
        assert outcome(response)["severity"] == "fatal"
        monkeypatch.setattr(Transaction, "create", original)
        for rtype in OUTPUT_TYPES:
            expected = 1 if rtype == "Media" else 0  # only the input Media
            assert total(client, rtype) == expected, rtype


def test_ood_refusal_is_422_with_the_reason_and_stores_nothing(tmp_path) -> None:
    with make_client(tmp_path, analyzer=tiny_analyzer(ood_gate=RefusingGate())) as client:
        m = create(client, media())
        response = client.post(f"/fhir/Media/{m['id']}/$analyze")
        assert response.status_code == 422
        issue = outcome(response)
        assert RefusingGate.reason in issue["diagnostics"] and issue["details"]["text"] == "not_chest_xray"
        assert total(client, "DiagnosticReport") == 0 and total(client, "Device") == 0


@pytest.mark.parametrize(
    ("body", "status", "expression"),
    [
        ({"resourceType": "Parameters", "parameter": []}, 400, "Parameters.parameter"),
        ({"resourceType": "Parameters", "parameter": [{"name": "bogus", "valueString": "x"}]}, 400, "Parameters.parameter[0].name"),
        ({"resourceType": "Parameters", "parameter": [{"name": "media", "resource": {"resourceType": "Patient"}}]}, 400, "Parameters.parameter[0].resource"),
        ({"resourceType": "Parameters", "parameter": [{"name": "media", "resource": media()}, {"name": "heatmaps", "valueString": "yes"}]}, 400, "Parameters.parameter[1].valueBoolean"),
        ({"resourceType": "Patient"}, 400, "resourceType"),
        (media(data="@@not-base64@@"), 400, "Media.content.data"),
        (media(content={"contentType": "image/png"}), 400, "Media.content"),
        (media(content={"url": "http://169.254.169.254/latest/meta-data"}), 403, "Media.content.url"),
        (media(content={"url": "https://elsewhere.example.com/x.png"}), 403, "Media.content.url"),
    ],
)
def test_bad_requests_get_an_operation_outcome(client, body, status, expression) -> None:
    response = client.post("/fhir/Media/$analyze", json=body)
    assert response.status_code == status, response.text
    assert expression in outcome(response).get("expression", [])
    assert total(client, "DiagnosticReport") == 0


def test_invalid_inline_media_is_rejected_with_its_path(client) -> None:
    bad = media(status="bogus")
    response = client.post("/fhir/Media/$analyze", json={"resourceType": "Parameters", "parameter": [{"name": "media", "resource": bad}]})
    assert response.status_code in (400, 422)
    assert any("status" in e for e in outcome(response)["expression"])
    response = client.post("/fhir/Media/$analyze", json=media(unknownElement=1))
    assert response.status_code == 400


def test_not_json_and_wrong_content_type(client) -> None:
    assert client.post("/fhir/Media/$analyze", content=b"{nope", headers={"Content-Type": "application/fhir+json"}).status_code == 400
    assert client.post("/fhir/Media/$analyze", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415


def test_unknown_and_deleted_media(client) -> None:
    assert client.post("/fhir/Media/nope/$analyze").status_code == 404
    m = create(client, media())
    assert client.delete(f"/fhir/Media/{m['id']}").status_code in (200, 204)
    assert client.post(f"/fhir/Media/{m['id']}/$analyze").status_code == 410


def test_instance_level_rejects_an_inline_resource(client) -> None:
    m = create(client, media())
    response = client.post(f"/fhir/Media/{m['id']}/$analyze", json={"resourceType": "Parameters", "parameter": [{"name": "media", "resource": media()}]})
    assert response.status_code == 400


def test_media_by_url_from_an_allowlisted_host(client) -> None:
    from analyze_support import HOST
    import base64

    png = base64.b64decode(png_b64())
    with respx.mock:
        route = respx.get(f"https://{HOST}/wado/img.png").mock(return_value=httpx.Response(200, content=png, headers={"content-type": "image/png"}))
        response = client.post("/fhir/Media/$analyze", json=media(content={"contentType": "image/png", "url": f"https://{HOST}/wado/img.png"}))
    assert response.status_code == 201, response.text
    assert route.called


STUDY = "1.2.826.0.1.3680043.8.498.77"


def test_imaging_study_via_dicomweb_end_to_end(client) -> None:
    assert client.put("/fhir/Endpoint/pacs", json=endpoint()).status_code in (200, 201)
    study = create(client, imaging_study(STUDY))
    pa = make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.1", view="PA", quadrant="top_left")
    lat = make_instance(STUDY, f"{STUDY}.2", f"{STUDY}.2.1", view="LL", quadrant="all")
    with respx.mock:
        mock_study(STUDY, [pa, lat], with_view=False)
        response = client.post(f"/fhir/ImagingStudy/{study['id']}/$analyze")
    assert response.status_code == 201, response.text
    kinds = by_type(response.json())
    report = kinds["DiagnosticReport"][0]
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{study['id']}"}]
    assert report["code"]["coding"][0]["code"] == "36643-5"  # PA + lateral exam
    assert "not frontal" in report["conclusion"]
    assert report["effectiveDateTime"].startswith("2024-05-01T09:30:00")
    for obs in kinds["Observation"]:
        assert obs["derivedFrom"] == [{"reference": f"ImagingStudy/{study['id']}"}]
    # only the PA image was analysed: the lateral (all white) would have detected everything
    detected = {o["code"]["coding"][-1]["code"] for o in kinds["Observation"] if o["interpretation"][0]["coding"][0]["code"] == "POS"}
    assert detected == {"pneumonia"}


def test_type_level_imaging_study_with_contained_endpoint_is_ingested_idempotently(client) -> None:
    pa = make_instance(STUDY, f"{STUDY}.1", f"{STUDY}.1.1", view="PA")
    study = imaging_study(STUDY, endpoint_ref="#ep")
    ep = endpoint("ep")
    study["contained"] = [ep]
    study["series"] = [{"uid": pa.series_uid, "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"},
                        "instance": [{"uid": pa.sop_uid, "sopClass": {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.1.1"}}]}]
    params = {"resourceType": "Parameters", "parameter": [{"name": "imagingStudy", "resource": study}, {"name": "heatmaps", "valueBoolean": False}]}
    with respx.mock:
        mock_instance(STUDY, pa)
        first = client.post("/fhir/ImagingStudy/$analyze", json=params)
        second = client.post("/fhir/ImagingStudy/$analyze", json=params)
    assert first.status_code == 201, first.text
    assert second.status_code == 200, second.text
    assert total(client, f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{STUDY}") == 1


def test_operation_definitions_are_published(client) -> None:
    from fhir.resources.R4B.operationdefinition import OperationDefinition

    for rid, rtype, pname in (("Media-analyze", "Media", "media"), ("ImagingStudy-analyze", "ImagingStudy", "imagingStudy")):
        response = client.get(f"/fhir/OperationDefinition/{rid}")
        assert response.status_code == 200
        od = OperationDefinition.model_validate(response.json())
        assert od.code == "analyze" and od.resource == [rtype] and od.type and od.instance and not od.system
        assert {(p.name, p.use) for p in od.parameter} == {(pname, "in"), ("heatmaps", "in"), ("return", "out")}
    assert client.get("/fhir/OperationDefinition/nope").status_code == 404


def test_analyze_outputs_pass_independent_validators(client) -> None:
    """Every resource $analyze returns or stores (sync, async Task, errors, definitions) through
    six validators we did not write; Node ones only where Node and the packages are installed."""
    from analyze_support import wait_until
    from conformance_checks import collect_resources, node_unavailable_reason, unique_resources, validate_resources

    m = create(client, media())
    payloads = [client.post(f"/fhir/Media/{m['id']}/$analyze").json(), client.post("/fhir/Media/$analyze", json=media()).json()]
    accepted = client.post(f"/fhir/Media/{m['id']}/$analyze", headers={"Prefer": "respond-async"})
    location = accepted.headers["content-location"]
    wait_until(lambda: client.get(location).status_code == 200)
    payloads += [accepted.json(), client.get(f"/fhir/Task/{location.rsplit('/', 1)[1]}").json()]
    payloads += [client.get(f"/fhir/OperationDefinition/{i}").json() for i in ("Media-analyze", "ImagingStudy-analyze")]
    payloads.append(client.post("/fhir/Media/$analyze", json={"resourceType": "Parameters", "parameter": []}).json())
    resources = unique_resources(collect_resources(payloads))
    assert {"DiagnosticReport", "Observation", "Media", "Binary", "Device", "Provenance", "Task", "OperationDefinition",
            "OperationOutcome", "Bundle"} <= {r["resourceType"] for r in resources}
    report = validate_resources(resources, node=node_unavailable_reason() is None)
    assert not report.problems, report.summary()
