"""End to end, as deployed: `cxr serve` (a subprocess) with its DICOM listener,
and a real Orthanc PACS that routes a study to it (C-STORE from Orthanc's own DICOM stack). The
study shows up in the FHIR store as ImagingStudy + DiagnosticReport, found by DICOM identifiers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from dicom_support import CR_SOP, make_file
from orthanc_fixture import orthanc  # noqa: F401 - the fixture
from proc_server import free_port, server_env, start_serve

REPO = Path(__file__).resolve().parent.parent
STUDY = "1.2.826.0.1.3680043.10.546.1"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data = tmp_path_factory.mktemp("cxr-serve")
    dicom_port = free_port()
    # generated images are not real films: the untrained registry model without the gate
    # (server_env; the shipped model and its gate on real films: test_dicom_scp's shared-samples test)
    env = server_env(data, CXR_DICOM_PORT=str(dicom_port), CXR_DICOM_AE_TITLE="CXRAI",
                     CXR_DICOM_ALLOWED_AES=json.dumps(["ORTHANC", "CXR-SCU"]), CXR_DICOM_STUDY_SETTLE_S="1",
                     CXR_QUEUE_POLL_S="0.3")
    proc = start_serve(env, data / "serve.log")
    try:
        proc.wait_ready(timeout=180)
        yield proc.base, dicom_port, data
    finally:
        proc.stop()


def wait_for(fn, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("not in time")


def test_cxr_dicom_echo_reaches_cxr_serve(served):
    _, dicom_port, _ = served
    r = subprocess.run([sys.executable, "-m", "fhir_server", "dicom", "echo", f"CXRAI@127.0.0.1:{dicom_port}"],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK (0x0000)" in r.stdout


def test_orthanc_routes_a_study_to_cxr_serve_and_the_report_is_found_over_fhir(served, orthanc, tmp_path):  # noqa: F811
    root, dicom_port, data = served
    files = [
        make_file(tmp_path, STUDY, f"{STUDY}.1", f"{STUDY}.1.1", view="PA", patient_id="MRN-77", issuer="1.2.3.4.5"),
        make_file(tmp_path, STUDY, f"{STUDY}.1", f"{STUDY}.1.2", view="LL", patient_id="MRN-77", issuer="1.2.3.4.5"),
        make_file(tmp_path, STUDY, f"{STUDY}.2", f"{STUDY}.2.1", view="AP", modality="CR", sop_class=CR_SOP,
                  patient_id="MRN-77", issuer="1.2.3.4.5"),
    ]
    orthanc_ids = {orthanc.upload(f.read_bytes())["ParentStudy"] for f in files}
    assert len(orthanc_ids) == 1
    with orthanc.client() as pacs:
        # what an administrator does in Orthanc's configuration ("DicomModalities"), here at run time
        pacs.put("/modalities/CXR", json={"AET": "CXRAI", "Host": "127.0.0.1", "Port": dicom_port}).raise_for_status()
        assert pacs.post("/modalities/CXR/echo", json={}).status_code == 200
        sent = pacs.post("/modalities/CXR/store", json={"Resources": list(orthanc_ids), "Synchronous": True}, timeout=120)
        assert sent.status_code == 200, sent.text

    fhir = httpx.Client(base_url=f"{root}/fhir", timeout=30)

    def report():
        bundle = fhir.get(f"/DiagnosticReport?study.identifier=urn:dicom:uid|urn:oid:{STUDY}").json()
        return bundle.get("entry")

    try:
        [entry] = wait_for(report)
    except AssertionError:
        tasks = fhir.get("/Task").json().get("entry", [])
        raise AssertionError(f"no report; Tasks: {tasks}; log: {(data / 'serve.log').read_text()[-3000:]}") from None
    dr = entry["resource"]
    assert dr["status"] == "preliminary" and len(dr["presentedForm"]) == 2  # PA + AP, not the lateral
    study = fhir.get(f"/{dr['imagingStudy'][0]['reference']}").json()
    assert study["numberOfInstances"] == 3 and study["identifier"][0]["value"] == f"urn:oid:{STUDY}"
    patient = fhir.get(f"/{study['subject']['reference']}").json()
    assert patient["identifier"][0]["system"] == "urn:oid:1.2.3.4.5" and patient["identifier"][0]["value"] == "MRN-77"
    by_patient = fhir.get("/DiagnosticReport?patient.identifier=urn:oid:1.2.3.4.5|MRN-77").json()
    assert [e["resource"]["id"] for e in by_patient["entry"]] == [dr["id"]]
    assert dr["subject"]["reference"] == study["subject"]["reference"]
