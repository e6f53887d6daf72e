"""$analyze on an ImagingStudy whose Endpoint is a REAL Orthanc's DICOMweb (QIDO-RS + WADO-RS),
not a mock: generated CR/DX instances are uploaded to Orthanc, then pulled and analysed by us."""

from __future__ import annotations

import io

import pydicom
import pytest
from analyze_support import by_type
from dicom_support import CR_SOP, make_file
from model_fixtures import tiny_analyzer
from orthanc_fixture import orthanc  # noqa: F401 - the fixture

STUDY = "1.2.826.0.1.3680043.10.545.1"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from fhir_server.app import create_app
    from fhir_server.settings import Settings

    settings = Settings(data_dir=tmp_path_factory.mktemp("cxr-orthanc"), database_url=None, auth_enabled=False,
                        ood_gate=False, base_url=None, fetch_allowed_hosts=["127.0.0.1"], fetch_timeout_s=20.0)
    analyzer = tiny_analyzer()
    with TestClient(create_app(settings, analyzer=analyzer)) as c:
        yield c
    analyzer.close()


@pytest.fixture(scope="module")
def uploaded(orthanc, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("orthanc-upload")
    files = [
        make_file(folder, STUDY, f"{STUDY}.1", f"{STUDY}.1.1", view="PA", modality="DX"),
        make_file(folder, STUDY, f"{STUDY}.1", f"{STUDY}.1.2", view="LL", modality="DX"),
        make_file(folder, STUDY, f"{STUDY}.2", f"{STUDY}.2.1", view="AP", modality="CR", sop_class=CR_SOP,
                  quadrant="bottom_right"),
    ]
    for f in files:
        assert orthanc.upload(f.read_bytes())["Status"] in ("Success", "AlreadyStored")
    return files


def imaging_study(address: str, **extra) -> dict:
    study = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}],
        "contained": [{
            "resourceType": "Endpoint", "id": "pacs", "status": "active",
            "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"},
            "payloadType": [{"text": "DICOM"}], "address": address,
        }],
        "endpoint": [{"reference": "#pacs"}],
    }
    study.update(extra)
    return study


def test_orthanc_serves_what_we_uploaded(orthanc, uploaded):  # noqa: F811
    import httpx

    r = httpx.get(f"{orthanc.dicomweb}/studies/{STUDY}/instances", headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200 and len(r.json()) == 3


def test_analyze_pulls_the_study_from_orthanc(client, orthanc, uploaded):  # noqa: F811
    created = client.post("/fhir/ImagingStudy", json=imaging_study(orthanc.dicomweb))
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    r = client.post(f"/fhir/ImagingStudy/{sid}/$analyze")
    assert r.status_code == 201, r.text
    found = by_type(r.json())
    [report] = found["DiagnosticReport"]
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{sid}"}]
    # the two frontal images were analysed (retrieved over WADO-RS), the lateral one was not
    assert len(report["presentedForm"]) == 2
    titles = " ".join(p["title"] for p in report["presentedForm"])
    assert f"{STUDY}.1.1" in titles and f"{STUDY}.2.1" in titles and f"{STUDY}.1.2" not in titles
    assert f"Skipped instance {STUDY}.1.2" in report["conclusion"] and "not frontal" in report["conclusion"]
    # a second run versions the same report
    again = client.post(f"/fhir/ImagingStudy/{sid}/$analyze")
    assert again.status_code == 200
    assert by_type(again.json())["DiagnosticReport"][0]["meta"]["versionId"] == "2"


def test_unknown_study_at_orthanc_is_a_clear_4xx(client, orthanc, uploaded):  # noqa: F811
    study = imaging_study(orthanc.dicomweb)
    study["identifier"] = [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.10.545.999"}]
    r = client.post("/fhir/ImagingStudy/$analyze", json=study)
    assert r.status_code in (404, 422), r.text
    assert r.json()["resourceType"] == "OperationOutcome"


def test_orthanc_is_refused_without_the_allowlist(tmp_path, orthanc, uploaded):  # noqa: F811
    from fastapi.testclient import TestClient

    from fhir_server.app import create_app
    from fhir_server.settings import Settings

    settings = Settings(data_dir=tmp_path, database_url=None, auth_enabled=False, ood_gate=False,
                        fetch_allowed_hosts=[])
    analyzer = tiny_analyzer()
    with TestClient(create_app(settings, analyzer=analyzer)) as c:
        r = c.post("/fhir/ImagingStudy/$analyze", json=imaging_study(orthanc.dicomweb))
    analyzer.close()
    assert r.status_code == 403, r.text


def test_wado_rs_returns_the_instance_bytes_we_uploaded(orthanc, uploaded):  # noqa: F811
    import httpx

    from fhir_server.imaging.multipart import parse_multipart_related

    url = f"{orthanc.dicomweb}/studies/{STUDY}/series/{STUDY}.1/instances/{STUDY}.1.1"
    r = httpx.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200
    [(_, payload)] = parse_multipart_related(r.content, r.headers["content-type"])
    ds = pydicom.dcmread(io.BytesIO(payload))
    assert ds.SOPInstanceUID == f"{STUDY}.1.1"
    assert ds.PixelData == pydicom.dcmread(uploaded[0]).PixelData
