"""Results out (issue 12): DICOM SR + heatmap SC built from a real $analyze, delivered by C-STORE
and STOW-RS into a real Orthanc, and as an HL7 ORU^R01 to a loopback MLLP listener; outages retried."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import subprocess
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from analyze_support import make_client, wait_until
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from model_fixtures import dicom_bytes, quadrant_pixels
from orthanc_fixture import orthanc  # noqa: F401 - the shared module-scoped fixture
from mllp_support import Listener
from orthanc_support import free_port, require_orthanc, start_orthanc

from fhir_server.dicom import delivery
from fhir_server.dicom.result_set import read_result_set
from fhir_server.dicom.sc import WARNING, build_scs
from fhir_server.dicom.sr import build_sr
from fhir_server.hl7v2 import mllp
from ml.findings import DISCLAIMER

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
FAST = {"queue_poll_s": 0.1, "delivery_backoff_s": 0.2, "delivery_backoff_max_s": 0.5, "hl7_ack_timeout_s": 2.0}


def source_file(tmp_path: Path, name: str = "src.dcm") -> tuple[Path, pydicom.Dataset]:
    """A generated DX whose top-left quadrant is white: the tiny model finds pneumonia there."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(quadrant_pixels(256, 256, quadrant="top_left"))))
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-42"
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19700102"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC-1001"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240501", "093000", "1"
    ds.ReferringPhysicianName = ""
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def analyse(client, path: Path) -> str:
    """The real $analyze code path on the DICOM file; returns the DiagnosticReport reference."""
    media = {
        "resourceType": "Media", "status": "completed", "subject": {"reference": "Patient/p1"},
        "content": {"contentType": "application/dicom", "data": base64.b64encode(path.read_bytes()).decode()},
    }
    body = {"resourceType": "Parameters", "parameter": [{"name": "media", "resource": media}]}
    response = client.post("/fhir/Media/$analyze", json=body)
    assert response.status_code == 201, response.text
    report = response.json()["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport"
    return f"DiagnosticReport/{report['id']}"


def contract(report: str, path: Path, ds: pydicom.Dataset) -> dict:
    return {"report": report, "imaging_study": "ImagingStudy/s1", "study_uid": str(ds.StudyInstanceUID),
            "instances": [str(path)]}


def deliveries(client, report: str) -> list[dict]:
    bundle = client.get(f"/fhir/Task?focus={report}&_count=50").json()
    return [e["resource"] for e in bundle.get("entry", [])]


def wait_tasks(client, report: str, count: int, status: str = "completed", timeout: float = 60.0) -> list[dict]:
    def done():
        tasks = deliveries(client, report)
        return tasks if len(tasks) == count and all(t["status"] == status for t in tasks) else None

    return wait_until(done, timeout=timeout, interval=0.2)


def assert_dciodvfy_clean(path: Path) -> None:
    """dicom3tools' validator finds no errors (warnings are allowed); skipped where not installed."""
    if not shutil.which("dciodvfy"):
        return
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, f"{path.name}: {errors}"


def settled(client, task_name: str, status: str):
    """The destination job once the worker has finished it (the handler records the Task first)."""
    def done():
        jobs = client.app.state.queue.list(task=task_name)
        return jobs[0] if jobs and jobs[0].status == status else None

    return wait_until(done, timeout=20)


def enqueue(client, payload: dict) -> str:
    app = client.app
    job = app.state.queue.enqueue(delivery.DELIVER, payload)
    return job


# ---------------------------------------------------------------------------------- SR / SC content


def test_sr_and_sc_carry_what_fhir_recorded(tmp_path: Path) -> None:
    path, ds = source_file(tmp_path)
    with make_client(tmp_path) as client:
        report = analyse(client, path)
        rs = read_result_set(client.app.state.store, report, [str(path)])
        observations = {}
        for ref in client.get(f"/fhir/{report}").json()["result"]:
            obs = client.get(f"/fhir/{ref['reference']}").json()
            observations[obs["code"]["text"]] = obs
    sr = build_sr(rs)
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.SeriesInstanceUID != ds.SeriesInstanceUID
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.AccessionNumber == "ACC-1001" and sr.PatientID == "MRN-42"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [x.ReferencedSOPInstanceUID for x in evidence] == [ds.SOPInstanceUID]

    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    content = parsed.content
    groups = content.get_planar_roi_measurement_groups()
    whole = content.get_image_measurement_groups()
    by_finding = {g.finding_type.meaning: g for g in whole}
    assert set(by_finding) == {"Pneumonia", "Pleural effusion", "Cardiomegaly"}
    for display, obs in observations.items():
        name = {"Effusion": "Pleural effusion"}.get(display, display)
        group = by_finding[name]
        (prob,) = group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
        assert prob.value == pytest.approx(obs["valueQuantity"]["value"], abs=1e-4)
        (evaluation,) = group.get_qualitative_evaluations()
        detected = obs["valueQuantity"]["value"] >= obs["referenceRange"][0]["high"]["value"]
        assert evaluation.value.meaning == ("Present" if detected else "Absent")
        text = {(i.ConceptNameCodeSequence[0].CodeValue, i.TextValue) for i in group[0].ContentSequence if i.ValueType == "TEXT"}
        assert {("111001", "test:tiny"), ("111003", "tiny-1"), ("111002", "operating_point.pneumonia=0.6")} <= text
    assert by_finding["Pneumonia"].get_qualitative_evaluations()[0].value.value == "52101004"
    # pneumonia's region is a SCOORD in the white top-left quadrant of the source image
    pneumonia_regions = [g for g in groups if g.finding_type.meaning == "Pneumonia"]
    assert pneumonia_regions
    region = pneumonia_regions[0].roi
    points = region.value
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert points[:, 0].max() <= 128 + 8 and points[:, 1].max() <= 128 + 8
    text = [item for item in sr.ContentSequence if item.ValueType == "TEXT"]
    assert DISCLAIMER in text[-1].TextValue

    scs = build_scs(rs)
    assert scs, "the analysis stored heatmaps, so there is an SC"
    sc = scs[0]
    assert sc.BurnedInAnnotation == "YES" and sc.StudyInstanceUID == ds.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (ds.SeriesInstanceUID, sr.SeriesInstanceUID)
    assert WARNING in sc.ImageComments and sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    band = sc.pixel_array[: sc.Rows // 20]
    assert (band[..., 0] > 200).any(), "the warning text is burned into the top band"

    # the same report version always makes the same objects (a re-delivery is a duplicate, not a new one)
    assert build_sr(rs).SOPInstanceUID == sr.SOPInstanceUID

    for name, obj in (("sr.dcm", sr), ("sc.dcm", sc)):
        obj.save_as(tmp_path / name, enforce_file_format=True)
        assert_dciodvfy_clean(tmp_path / name)
    if shutil.which("dsrdump"):
        dump = subprocess.run(["dsrdump", str(tmp_path / "sr.dcm")], capture_output=True, text=True, timeout=60).stdout
        assert '(233604007,SCT,"Pneumonia")' in dump and '"Probability"' in dump and "SCOORD" in dump
        assert '(52101004,SCT,"Present")' in dump


# ---------------------------------------------------------------------------------- Orthanc


def _orthanc_has(orthanc, uids: list[str]) -> dict[str, pydicom.Dataset]:
    return {uid: pydicom.dcmread(io.BytesIO(orthanc.instance_file(uid))) for uid in uids}


def test_cstore_delivers_sr_and_sc_into_orthanc(tmp_path: Path, orthanc) -> None:
    path, ds = source_file(tmp_path)
    with make_client(tmp_path, dicom_destination=orthanc.destination, **FAST) as client:
        report = analyse(client, path)
        enqueue(client, contract(report, path, ds))
        (task,) = wait_tasks(client, report, 1)
        stored = [o["valueString"].split()[2].rstrip(":") for o in task["output"]]
        assert task["code"]["coding"][0]["code"] == "deliver" and task["for"] == {"reference": "Patient/p1"}
        assert any("C-STORE" in i.get("valueString", "") for i in task["input"])
    found = _orthanc_has(orthanc, stored)
    classes = [str(d.SOPClassUID) for d in found.values()]
    assert classes.count(COMPREHENSIVE_3D_SR) == 1 and set(classes) == {COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE}
    for d in found.values():
        assert d.StudyInstanceUID == ds.StudyInstanceUID
    sr = next(d for d in found.values() if d.SOPClassUID == COMPREHENSIVE_3D_SR)
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    findings = {g.finding_type.meaning for g in parsed.content.get_image_measurement_groups()}
    assert "Pneumonia" in findings
    rois = parsed.content.get_planar_roi_measurement_groups()
    assert rois and rois[0].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert refs[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    # Orthanc groups them with the study (same StudyInstanceUID -> one study, two new series)
    study = [x for x in orthanc.lookup(str(ds.StudyInstanceUID)) if x["Type"] == "Study"][0]
    series = orthanc.get(f"/studies/{study['ID']}/series").json()
    assert {s["MainDicomTags"].get("SeriesDescription") for s in series} >= {
        "AI RESULT - PRELIMINARY, NOT A DIAGNOSIS", "AI HEATMAP - PRELIMINARY, NOT FOR DIAGNOSIS"}


def test_stow_rs_delivers_into_orthanc_dicomweb(tmp_path: Path, orthanc) -> None:
    path, ds = source_file(tmp_path)
    with make_client(tmp_path, dicomweb_stow_url=orthanc.dicomweb, fetch_allowed_hosts=["127.0.0.1"], **FAST) as client:
        report = analyse(client, path)
        enqueue(client, contract(report, path, ds))
        (task,) = wait_tasks(client, report, 1)
        stored = [o["valueString"].split()[2].rstrip(":") for o in task["output"] if o["type"]["text"] == "stored"]
    assert len(stored) >= 2
    found = _orthanc_has(orthanc, stored)
    assert {d.StudyInstanceUID for d in found.values()} == {ds.StudyInstanceUID}
    assert {str(d.SOPClassUID) for d in found.values()} == {COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE}


def test_stow_url_outside_the_allowlist_fails_without_a_connection(tmp_path: Path) -> None:
    path, ds = source_file(tmp_path)
    with make_client(tmp_path, dicomweb_stow_url="http://127.0.0.1:9/dicom-web", fetch_allowed_hosts=[], **FAST) as client:
        report = analyse(client, path)
        enqueue(client, contract(report, path, ds))
        (task,) = wait_tasks(client, report, 1, status="failed")
        assert "not allowed" in task["statusReason"]["text"]


def test_destination_down_is_retried_and_delivered_when_it_returns(tmp_path: Path) -> None:
    require_orthanc()
    port = free_port()
    path, ds = source_file(tmp_path)
    server = None
    try:
        with make_client(tmp_path, dicom_destination=f"ORTHANC@127.0.0.1:{port}", dicom_timeout_s=2.0, **FAST) as client:
            report = analyse(client, path)
            enqueue(client, contract(report, path, ds))
            retrying = wait_until(lambda: [t for t in deliveries(client, report) if t.get("statusReason")], timeout=30)
            assert retrying[0]["status"] == "in-progress" and "retrying" in retrying[0]["businessStatus"]["text"]
            server = start_orthanc(tmp_path / "late-orthanc", dicom_port=port)
            (task,) = wait_tasks(client, report, 1)
            stored = [o["valueString"].split()[2].rstrip(":") for o in task["output"]]
            job = settled(client, delivery.DICOM_STORE, "done")
            assert job.attempts >= 2
        assert _orthanc_has(server, stored)
    finally:
        if server is not None:
            server.stop()


# ---------------------------------------------------------------------------------- HL7 ORU over MLLP


@pytest.fixture
def listener():
    made: list[Listener] = []

    def make(answers, port: int = 0):
        made.append(Listener(answers, port))
        return made[-1]

    yield make
    for item in made:
        item.close()


def test_oru_is_retried_on_ae_and_silence_and_never_resent_once_acknowledged(tmp_path: Path, listener) -> None:
    server = listener(["AE", None, "AA"])
    path, ds = source_file(tmp_path)
    with make_client(tmp_path, hl7_destination=f"127.0.0.1:{server.port}", **FAST) as client:
        report = analyse(client, path)
        enqueue(client, contract(report, path, ds))
        (task,) = wait_tasks(client, report, 1)
        outputs = {o["type"]["text"]: o["valueString"] for o in task["output"]}
        assert outputs["hl7-ack-code"] == "AA"
        # the job ran again (a worker died after the ACK, say): the recorded ACK stops a second send
        sent = len(server.messages)
        job = client.app.state.queue.list(task=delivery.HL7_ORU)[0]
        result = asyncio.run(delivery.deliver_hl7_oru(client.app, job.payload))
        assert result == {"skipped": "already acknowledged"}
        assert len(server.messages) == sent == 3
    control_ids = {parse_message(m, find_groups=False).msh.msh_10.value for m in server.messages}
    assert control_ids == {outputs["hl7-message-control-id"]}, "retries resend the same message"

    strict = parse_message(server.messages[-1], validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert strict.validate(), "hl7apy's strict v2.5.1 ORU_R01 structure validation"
    msg = parse_message(server.messages[-1], find_groups=True)
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msg.msh.msh_12.value == "2.5.1"
    result = msg.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == "MRN-42^^^HOSP^MR" and pid.pid_5.to_er7() == "Doe^Jane"
    assert pid.pid_7.value == "19700102" and pid.pid_8.value == "F"
    order = result.oru_r01_order_observation
    assert order.obr.obr_4.to_er7().startswith("36554-4^") and order.obr.obr_3.to_er7() == "ACC-1001"
    assert order.obr.obr_19.value == ds.StudyInstanceUID and order.obr.obr_25.value == "P"
    obx = [o.obx for o in order.oru_r01_observation]
    by_code = {o.obx_3.to_er7().split("^")[0]: o for o in obx}
    pneumonia = by_code["233604007"]
    assert pneumonia.obx_2.value == "NM" and pneumonia.obx_8.value == "A" and 0.6 <= float(pneumonia.obx_5.value) <= 1
    assert by_code["60046008"].obx_8.value == "N"
    assert by_code["110180"].obx_5.value == ds.StudyInstanceUID
    impression = by_code["19005-8"].obx_5.to_er7()
    assert "not a diagnosis" in impression


def test_pending_delivery_survives_a_restart(tmp_path: Path, listener) -> None:
    """The RIS is down, the server restarts, the RIS comes back: the queued ORU still arrives, once."""
    port = free_port()
    path, ds = source_file(tmp_path)
    settings = {"hl7_destination": f"127.0.0.1:{port}", **FAST}
    with make_client(tmp_path, **settings) as client:
        report = analyse(client, path)
        enqueue(client, contract(report, path, ds))
        wait_until(lambda: [t for t in deliveries(client, report) if t.get("statusReason")], timeout=30)
    server = listener(["AA"], port)
    with make_client(tmp_path, **settings) as client:  # a new process on the same database
        (task,) = wait_tasks(client, report, 1)
        assert {o["type"]["text"]: o["valueString"] for o in task["output"]}["hl7-ack-code"] == "AA"
        settled(client, delivery.HL7_ORU, "done")
    assert len(server.messages) == 1


def test_oru_rejected_for_good_after_the_last_attempt(tmp_path: Path, listener) -> None:
    server = listener(["AR", "AR", "AR"])
    path, ds = source_file(tmp_path)
    with make_client(tmp_path, hl7_destination=f"127.0.0.1:{server.port}", delivery_max_attempts=3, **FAST) as client:
        report = analyse(client, path)
        enqueue(client, contract(report, path, ds))
        (task,) = wait_tasks(client, report, 1, status="failed")
        assert "AR" in task["statusReason"]["text"] and "gave up after 3 attempts" in task["statusReason"]["text"]
        settled(client, delivery.HL7_ORU, "failed")
    assert len(server.messages) == 3


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("payload, reason", [
    ({"report": "Patient/x", "instances": ["/nope.dcm"]}, "bad results.deliver payload"),
    ({"report": "DiagnosticReport/unknown", "instances": ["/nope.dcm"]}, "does not exist"),
])
def test_bad_deliver_payload_fails_the_job_and_writes_nothing(tmp_path: Path, payload: dict, reason: str) -> None:
    with make_client(tmp_path, hl7_destination="127.0.0.1:9", **FAST) as client:
        job_id = enqueue(client, payload)
        job = wait_until(lambda: (j := client.app.state.queue.get(job_id)) and j.status == "failed" and j, timeout=20)
        assert reason in job.last_error
        assert client.get("/fhir/Task").json()["total"] == 0
        assert client.app.state.queue.list(task=delivery.HL7_ORU) == []


def test_missing_source_file_fails_with_its_path(tmp_path: Path) -> None:
    path, ds = source_file(tmp_path)
    with make_client(tmp_path, hl7_destination="127.0.0.1:9", **FAST) as client:
        report = analyse(client, path)
        job_id = enqueue(client, contract(report, tmp_path / "gone.dcm", ds))
        job = wait_until(lambda: (j := client.app.state.queue.get(job_id)) and j.status == "failed" and j, timeout=20)
        assert "gone.dcm" in job.last_error and "missing" in job.last_error


def test_malformed_destinations_are_refused() -> None:
    from fhir_server.dicom.store_scu import parse_destination

    assert str(parse_destination("PACS@10.0.0.5:104")) == "PACS@10.0.0.5:104"
    for bad in ("PACS@host", "@host:104", "PACS@host:0", "A_TITLE_LONGER_THAN_16@h:104", "host:104"):
        with pytest.raises(ValueError):
            parse_destination(bad)
    with pytest.raises(ValueError):
        delivery._host_port("no-port")


def test_study_of_two_images_refers_each_finding_to_its_own_image(tmp_path: Path) -> None:
    """$analyze of an ImagingStudy (DICOMweb, respx): pneumonia comes from the PA image, effusion
    from the AP one; the SR's regions and the SCs must point at those images, not the first one."""
    import respx
    from dicomweb_fixtures import endpoint, imaging_study, make_instance, mock_study

    study_uid = "1.2.826.0.1.3680043.8.498.4242"
    pa = make_instance(study_uid, f"{study_uid}.1", f"{study_uid}.1.1", view="PA", quadrant="top_left")
    ap = make_instance(study_uid, f"{study_uid}.2", f"{study_uid}.2.1", view="AP", quadrant="bottom_right")
    paths = []
    for inst in (pa, ap):
        paths.append(tmp_path / f"{inst.sop_uid}.dcm")
        paths[-1].write_bytes(inst.data)
    with make_client(tmp_path) as client:
        assert client.put("/fhir/Endpoint/pacs", json=endpoint()).status_code in (200, 201)
        created = client.post("/fhir/ImagingStudy", json=imaging_study(study_uid)).json()
        with respx.mock:
            mock_study(study_uid, [pa, ap])
            response = client.post(f"/fhir/ImagingStudy/{created['id']}/$analyze")
        assert response.status_code == 201, response.text
        report = f"DiagnosticReport/{response.json()['entry'][0]['resource']['id']}"
        rs = read_result_set(client.app.state.store, report, [str(p) for p in paths])
    source_of = {f.label: f.source_uid for f in rs.findings}
    assert source_of["pneumonia"] == pa.sop_uid and source_of["effusion"] == ap.sop_uid
    parsed = hd.sr.Comprehensive3DSR.from_dataset(build_sr(rs))
    region_source = {
        g.finding_type.meaning: g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for g in parsed.content.get_planar_roi_measurement_groups()
    }
    assert region_source == {"Pneumonia": pa.sop_uid, "Pleural effusion": ap.sop_uid}
    library = parsed.content[0].ContentSequence
    listed = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
              for c in library if c.ValueType == "CONTAINER" and c.ConceptNameCodeSequence[0].CodeValue == "111028"
              for grp in c.ContentSequence for i in grp.ContentSequence if i.ValueType == "IMAGE"}
    assert listed == {pa.sop_uid, ap.sop_uid}
    sc_source = {sc.ImageComments.split(".")[1].split(" p=")[0].strip(): sc.SourceImageSequence[0].ReferencedSOPInstanceUID
                 for sc in build_scs(rs)}
    assert sc_source["Pneumonia"] == pa.sop_uid and sc_source["Effusion"] == ap.sop_uid


REAL_SAMPLES = (
    "barre_CR-MONO1-10-chest_nometa.dcm",  # no file meta, MONOCHROME1
    "nih_google_dx_secondary_capture_nofinding.dcm",  # SC source, odd Patient Age
    "siim_cr_pa_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",  # JPEG Baseline
)


@pytest.mark.parametrize("name", REAL_SAMPLES)
def test_real_dicom_samples_give_valid_sr_and_sc(tmp_path: Path, shared_data: Path, name: str) -> None:
    source = shared_data / "dicom" / name
    if not source.is_file():
        pytest.skip(f"{source} not present")
    path = tmp_path / "src.dcm"
    path.write_bytes(source.read_bytes())
    with make_client(tmp_path) as client:
        report = analyse(client, path)
        rs = read_result_set(client.app.state.store, report, [str(path)])
    objects = [build_sr(rs), *build_scs(rs)]
    assert len(objects) >= 2
    for i, obj in enumerate(objects):
        assert obj.StudyInstanceUID == rs.study_uid
        obj.save_as(tmp_path / f"out{i}.dcm", enforce_file_format=True)
        assert_dciodvfy_clean(tmp_path / f"out{i}.dcm")


def test_compose_example_routes_cr_dx_to_us_and_keeps_our_results(tmp_path: Path) -> None:
    """deploy/compose.pacs.yaml's Orthanc rule, run in a real Orthanc: a DX it stores is forwarded
    to the "cxr" modality; the SR we send back is not (no loop)."""
    import yaml
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from fhir_server.dicom.store_scu import parse_destination, store

    require_orthanc()
    compose = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "compose.pacs.yaml").read_text())
    lua = tmp_path / "forward.lua"
    lua.write_text(compose["configs"]["forward-lua"]["content"])
    assert "CXR_DICOM_DESTINATION" in compose["services"]["cxr"]["environment"]

    received: list[str] = []

    def on_store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    scp = AE(ae_title="CXR")
    scp.supported_contexts = AllStoragePresentationContexts
    scp_port = free_port()
    server = scp.start_server(("127.0.0.1", scp_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    orthanc = None
    try:
        orthanc = start_orthanc(tmp_path / "pacs", extra={
            "LuaScripts": [str(lua)], "DicomModalities": {"cxr": ["CXR", "127.0.0.1", scp_port]}})
        path, ds = source_file(tmp_path)
        with make_client(tmp_path) as client:
            rs = read_result_set(client.app.state.store, analyse(client, path), [str(path)])
        sr = build_sr(rs)
        store(parse_destination(orthanc.destination), [ds, sr], calling_ae="MODALITY", timeout_s=10)
        wait_until(lambda: ds.SOPInstanceUID in received, timeout=30)
        time.sleep(1.0)  # give a wrongly forwarded SR the time to arrive too
        assert received == [ds.SOPInstanceUID]
    finally:
        server.shutdown()
        if orthanc is not None:
            orthanc.stop()


def _stow_answer(uids: list[str]) -> dict:
    return {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids]}}


def test_stow_retries_5xx_and_fails_for_good_on_4xx(tmp_path: Path) -> None:
    import httpx
    import respx
    from analyze_support import HOST

    url = f"https://{HOST}/dicom-web"
    path, ds = source_file(tmp_path)
    with make_client(tmp_path, dicomweb_stow_url=url, **FAST) as client:
        report = analyse(client, path)
        with respx.mock(assert_all_called=False) as mock:
            seen: list[int] = []

            def answer(request: httpx.Request) -> httpx.Response:
                seen.append(1)
                if len(seen) <= 2:
                    return httpx.Response(503)
                parts = request.content.count(b"Content-Type: application/dicom")
                return httpx.Response(200, json=_stow_answer([f"1.2.3.{i}" for i in range(parts)]))

            route = mock.post(f"{url}/studies").mock(side_effect=answer)
            enqueue(client, contract(report, path, ds))
            (task,) = wait_tasks(client, report, 1)
        assert route.call_count == 3
        assert route.calls[-1].request.headers["content-type"].startswith('multipart/related; type="application/dicom"')
        assert [o["valueString"] for o in task["output"]][0].endswith("STOW-RS 200")

    (tmp_path / "second").mkdir()
    path2, ds2 = source_file(tmp_path / "second")
    with make_client(tmp_path / "second", dicomweb_stow_url=url, **FAST) as client:
        report = analyse(client, path2)
        with respx.mock(assert_all_called=False) as mock:
            route = mock.post(f"{url}/studies").mock(return_value=httpx.Response(400))
            enqueue(client, contract(report, path2, ds2))
            (task,) = wait_tasks(client, report, 1, status="failed")
        assert route.call_count == 1 and "400" in task["statusReason"]["text"]


def test_cstore_failure_status_fails_the_delivery_without_retrying(tmp_path: Path) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    calls: list[str] = []

    def refuse(event):
        calls.append(str(event.dataset.SOPInstanceUID))
        return 0xC000  # "cannot understand": sending the same bytes again will not help

    scp = AE(ae_title="PICKY")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)])
    try:
        path, ds = source_file(tmp_path)
        with make_client(tmp_path, dicom_destination=f"PICKY@127.0.0.1:{port}", **FAST) as client:
            report = analyse(client, path)
            enqueue(client, contract(report, path, ds))
            (task,) = wait_tasks(client, report, 1, status="failed")
            assert "0xC000" in task["statusReason"]["text"]
            job = settled(client, delivery.DICOM_STORE, "failed")
            assert job.attempts == 1
        assert len(calls) == 1
    finally:
        server.shutdown()


@pytest.mark.postgres
def test_delivery_on_postgres(tmp_path: Path, listener) -> None:
    """The production database: Task writes, the outbox enqueue and SKIP LOCKED claims on PostgreSQL."""
    import os
    import uuid

    from sqlalchemy import create_engine, text

    url = os.environ.get("CXR_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("CXR_TEST_POSTGRES_URL not set")
    name = f"cxr_out_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        server = listener(["AE", "AA"])
        path, ds = source_file(tmp_path)
        db_url = url.rsplit("/", 1)[0] + "/" + name
        with make_client(tmp_path, database_url=db_url, hl7_destination=f"127.0.0.1:{server.port}", **FAST) as client:
            report = analyse(client, path)
            enqueue(client, contract(report, path, ds))
            (task,) = wait_tasks(client, report, 1)
            assert {o["type"]["text"]: o["valueString"] for o in task["output"]}["hl7-ack-code"] == "AA"
        assert len(server.messages) == 2
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
