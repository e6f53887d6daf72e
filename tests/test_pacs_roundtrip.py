"""Issue 12 "Done when", as deployed: a study sent with dcmtk's `storescu` to a running `cxr serve`
(a subprocess, the shipped model with its gate) comes back analysed in a real Orthanc as an SR and
an SC next to the original images, in the FHIR store as ImagingStudy + DiagnosticReport (found by
FHIR search, with a completed delivery Task per destination), and at a loopback MLLP listener as
one acknowledged ORU^R01. Sending it again changes nothing; the cat radiograph is refused and sent
nowhere. The same holds with the API and the DICOM listener in different processes (`cxr serve`
with CXR_QUEUE_WORKER=false + `cxr worker` with CXR_DICOM_PORT), as deploy/compose.yaml runs it.

Films: a real human CR from the shared data when present, run by the shipped cxr:pneumonia-v1 with
its gate; where the shared data is absent (CI), a generated CR run by the untrained registry model
without the gate (generated pixels are not a chest film), and the cat test skips.

The elapsed times (last C-STORE -> report stored / SR in Orthanc / ORU acknowledged) are printed
(`pytest -s`), not asserted beyond a generous bound: the machine is shared."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import httpx
import pydicom
import pytest
from dicom_support import CR_SOP, make_file
from hl7apy.parser import parse_message
from mllp_support import Listener
from orthanc_fixture import orthanc  # noqa: F401 - the shared module-scoped fixture
from orthanc_support import OrthancServer
from proc_server import ROOT, Proc, free_port, server_env, start_serve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HUMAN = "siim_cr_pa_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"  # real human CR, PA
CAT = "feline_dx_chest_ap_deid_data.dcm"  # labels.csv: NOT human (cat) -> refused by the gate
ACCESSION, MRN, ISSUER = "ACC-E2E-7", "MRN-E2E-7", "1.2.3.4.5.6"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DELIVERY_BOUND_S = 120.0  # seconds from the last C-STORE; "within seconds" on an idle machine


def storescu(port: int, called: str, *files: Path, calling: str = "MODALITY") -> None:
    tool = shutil.which("storescu")
    if tool is None:
        pytest.skip("storescu (dcmtk) is not installed")
    # -xy: also propose JPEG baseline, so the compressed sample goes as it is
    r = subprocess.run([tool, "-xy", "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass(frozen=True)
class Films:
    human: Path  # a frontal chest film with the accession number, MRN and issuer a RIS-scheduled study carries
    cat: Path | None  # the cat radiograph (refused by the shipped gate); None without the shared data
    model_env: dict[str, str]


@pytest.fixture(scope="module")
def samples(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Films:
    """Copies in tmp (never in the repository); the public sample has no accession number or issuer."""
    out = tmp_path_factory.mktemp("samples")
    shared = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data")) / "dicom"  # as conftest.py
    if not (shared / HUMAN).exists():
        uid = f"1.2.826.0.1.3680043.10.547.{time.time_ns()}"  # short enough for the ".1.1" suffixes (UI <= 64)
        human = make_file(out, uid, f"{uid}.1", f"{uid}.1.1", view="PA", modality="CR", sop_class=CR_SOP, size=256,
                          patient_id=MRN, issuer=ISSUER, accession=ACCESSION)
        return Films(human, None, {"CXR_MODEL": "cxr:untrained-demo", "CXR_OOD_GATE": "false"})
    request.getfixturevalue("bundled_model")  # skips where the shipped weights are not installed
    human = out / HUMAN
    ds = pydicom.dcmread(shared / HUMAN)
    ds.AccessionNumber, ds.PatientID, ds.IssuerOfPatientID = ACCESSION, MRN, ISSUER
    ds.save_as(human, enforce_file_format=True)
    cat = None
    if (shared / CAT).exists():
        cat = out / CAT
        shutil.copy(shared / CAT, cat)
    return Films(human, cat, {"CXR_MODEL": "cxr:pneumonia-v1", "CXR_OOD_GATE": "true"})


@pytest.fixture(scope="module")
def ris() -> Iterator[Listener]:
    listener = Listener(["AA"] * 20)
    yield listener
    listener.close()


def node_env(data: Path, orthanc: OrthancServer, ris: Listener, films: Films, dicom_port: int,  # noqa: F811
             **extra: str) -> dict[str, str]:
    """What the README quick start sets: the three settings (the shipped model, the gate on)."""
    return server_env(
        data,
        **films.model_env,
        CXR_ENGINE="onnx",  # the default (server_env picks torch for speed; the quick start runs the default)
        CXR_DICOM_PORT=str(dicom_port),
        CXR_DICOM_DESTINATION=orthanc.destination,
        CXR_HL7_DESTINATION=f"127.0.0.1:{ris.port}",
        CXR_DICOM_STUDY_SETTLE_S="1", CXR_QUEUE_POLL_S="0.3", CXR_DELIVERY_BACKOFF_S="1",
        **extra,
    )


@pytest.fixture(scope="module")
def node(samples: Films, orthanc: OrthancServer, ris: Listener, tmp_path_factory) -> Iterator[tuple[Proc, int]]:  # noqa: F811
    data = tmp_path_factory.mktemp("cxr-serve")
    dicom_port = free_port()
    proc = start_serve(node_env(data, orthanc, ris, samples, dicom_port), data / "serve.log")
    try:
        proc.wait_ready(timeout=240)
        yield proc, dicom_port
    finally:
        proc.stop()


def search(fhir: httpx.Client, query: str) -> list[dict]:
    r = fhir.get(f"/{query}")
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


def orthanc_study(orthanc: OrthancServer, study_uid: str) -> str | None:  # noqa: F811
    found = [x["ID"] for x in orthanc.lookup(study_uid) if x["Type"] == "Study"]
    return found[0] if found else None


def orthanc_instances(orthanc: OrthancServer, study_uid: str, sop_class: str) -> list[pydicom.Dataset]:  # noqa: F811
    sid = orthanc_study(orthanc, study_uid)
    if sid is None:
        return []
    out = []
    for inst in orthanc.get(f"/studies/{sid}/instances").json():
        tags = orthanc.get(f"/instances/{inst['ID']}/simplified-tags").json()
        if tags.get("SOPClassUID") == sop_class:
            out.append(pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{inst['ID']}/file").content)))
    return out


def deliver_and_measure(fhir: httpx.Client, orthanc: OrthancServer, ris: Listener, study_uid: str,  # noqa: F811
                        sent_at: float, log: Path) -> dict[str, float]:
    """Poll the three places until each has the result; seconds after the last C-STORE."""
    acks_before = len(ris.answered)
    seen: dict[str, float] = {}
    deadline = sent_at + DELIVERY_BOUND_S
    while len(seen) < 3:
        now = time.monotonic()
        if now > deadline:
            raise AssertionError(f"not delivered within {DELIVERY_BOUND_S} s (seen {seen}); "
                                 f"Tasks: {search(fhir, 'Task')}; log: {log.read_text()[-3000:]}")
        if "report" not in seen and search(fhir, f"DiagnosticReport?study.identifier=urn:dicom:uid|urn:oid:{study_uid}"):
            seen["report"] = time.monotonic() - sent_at
        if "sr" not in seen and orthanc_instances(orthanc, study_uid, COMPREHENSIVE_3D_SR):
            seen["sr"] = time.monotonic() - sent_at
        if "oru" not in seen and len(ris.answered) > acks_before:
            seen["oru"] = ris.answered[-1][1] - sent_at
        time.sleep(0.1)
    return seen


def check_delivered(fhir: httpx.Client, orthanc: OrthancServer, ris: Listener, source: pydicom.Dataset) -> None:  # noqa: F811
    study_uid, sop_uid = str(source.StudyInstanceUID), str(source.SOPInstanceUID)
    # (b) the FHIR side, by the searches an EHR makes
    [study] = search(fhir, f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{study_uid}")
    [report] = search(fhir, f"DiagnosticReport?patient.identifier=urn:oid:{ISSUER}|{MRN}")
    assert report["status"] == "preliminary"
    assert report["imagingStudy"][0]["reference"] == f"ImagingStudy/{study['id']}"
    observations = [fhir.get(f"/{r['reference']}").json() for r in report.get("result", [])]
    deadline = time.monotonic() + 30
    while True:  # the DICOM and HL7 Tasks complete independently: each has its own job
        tasks = search(fhir, f"Task?focus=DiagnosticReport/{report['id']}")
        if len(tasks) == 2 and all(t["status"] == "completed" for t in tasks) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    labels = sorted(next(i["valueString"] for i in t["input"] if i["type"]["text"] == "destination") for t in tasks)
    assert labels == [f"DICOM C-STORE {orthanc.destination}", f"HL7 v2 MLLP 127.0.0.1:{ris.port}"], tasks
    assert [t["status"] for t in tasks] == ["completed", "completed"], tasks
    assert {t["id"] for t in tasks} <= {t["id"] for t in search(fhir, "Task?code=deliver")}

    # (a) in Orthanc: SR and SC in the same study as the original, each in a new series
    [sr] = orthanc_instances(orthanc, study_uid, COMPREHENSIVE_3D_SR)
    sid = orthanc_study(orthanc, study_uid)
    series = orthanc.get(f"/studies/{sid}/series").json()
    by_modality: dict[str, list[str]] = {}
    for s in series:
        by_modality.setdefault(s["MainDicomTags"].get("Modality", ""), []).append(s["MainDicomTags"]["SeriesInstanceUID"])
    assert str(source.SeriesInstanceUID) in by_modality.get(str(source.Modality), []), by_modality
    assert len(series) == 3, by_modality  # the original + the SR series + the heatmap series
    assert sr.StudyInstanceUID == study_uid and sr.SeriesInstanceUID != source.SeriesInstanceUID
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = parsed.content.get_image_measurement_groups()
    findings = {g.finding_type.meaning for g in groups}
    assert groups, "no finding in the SR"
    assert {o["code"]["coding"][0]["display"] for o in observations if o.get("code", {}).get("coding")} & findings
    refs = [r.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
            for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence]
    assert refs == [sop_uid]
    heatmaps = [d for d in orthanc_instances(orthanc, study_uid, SECONDARY_CAPTURE) if d.SOPInstanceUID != sop_uid]
    assert heatmaps, "no heatmap Secondary Capture in Orthanc"
    for sc in heatmaps:
        assert sc.BurnedInAnnotation == "YES" and sc.StudyInstanceUID == study_uid
        assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, sr.SeriesInstanceUID)

    # (c) exactly one ORU^R01, acknowledged, with the right PID / OBR and an OBX per finding
    assert len(ris.messages) == 1 and [a for a, _ in ris.answered] == ["AA"]
    msg = parse_message(ris.messages[0], find_groups=True)
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    result = msg.oru_r01_patient_result
    assert result.oru_r01_patient.pid.pid_3.to_er7().startswith(f"{MRN}^^^")
    order = result.oru_r01_order_observation
    assert order.obr.obr_3.to_er7() == ACCESSION and order.obr.obr_19.value == study_uid
    assert order.obr.obr_4.to_er7().startswith("36554-4^")
    obx = [o.obx for o in order.children if o.name == "ORU_R01_OBSERVATION"]
    numeric = [x for x in obx if x.obx_2.value == "NM"]
    assert len(numeric) == len(groups) and {x.obx_8.value for x in numeric} <= {"A", "N"}
    control = next(o["valueString"] for t in tasks for o in t.get("output", [])
                   if o["type"]["text"] == "hl7-message-control-id")
    assert msg.msh.msh_10.value == control


def send_and_check(label: str, fhir: httpx.Client, orthanc: OrthancServer, ris: Listener, path: Path,  # noqa: F811
                   dicom_port: int, log: Path, capsys) -> pydicom.Dataset:
    """The PACS holds the originals; the study goes to our SCP; the result must reach all three."""
    source = pydicom.dcmread(path, stop_before_pixels=True)
    storescu(orthanc.dicom_port, orthanc.aet, path)
    storescu(dicom_port, "CXR", path)
    sent_at = time.monotonic()
    times = deliver_and_measure(fhir, orthanc, ris, str(source.StudyInstanceUID), sent_at, log)
    with capsys.disabled():
        print(f"\n[roundtrip {label}] last C-STORE -> report stored {times['report']:.2f} s, SR in Orthanc "
              f"{times['sr']:.2f} s, ORU acknowledged {times['oru']:.2f} s (load average {load_avg()})")
    check_delivered(fhir, orthanc, ris, source)
    return source


def test_storescu_to_cxr_serve_reaches_orthanc_fhir_and_the_ris_once(node, orthanc, ris, samples, capsys):  # noqa: F811
    proc, dicom_port = node
    human = samples.human
    fhir = httpx.Client(base_url=f"{proc.base}/fhir", timeout=30)
    source = send_and_check("cxr serve", fhir, orthanc, ris, human, dicom_port, proc.log, capsys)

    # the same study again -- from the modality, from another sender, and routed by the PACS
    # (Orthanc's own DICOM stack and AE title): no second report version, SR or ORU
    storescu(dicom_port, "CXR", human)
    storescu(dicom_port, "CXR", human, calling="OTHER-MODALITY")
    with orthanc.client() as pacs:
        pacs.put("/modalities/cxr", json={"AET": "CXR", "Host": "127.0.0.1", "Port": dicom_port}).raise_for_status()
        sid = orthanc_study(orthanc, str(source.StudyInstanceUID))
        originals = [i["ID"] for i in pacs.get(f"/studies/{sid}/instances").json()
                     if i["MainDicomTags"]["SOPInstanceUID"] == source.SOPInstanceUID]
        routed = pacs.post("/modalities/cxr/store", json={"Resources": originals, "Synchronous": True}, timeout=120)
        assert routed.status_code == 200, routed.text
    time.sleep(6)  # settle (1 s) + queue polls + what a delivery took above
    reports = search(fhir, f"DiagnosticReport?study.identifier=urn:dicom:uid|urn:oid:{source.StudyInstanceUID}")
    assert [r["meta"]["versionId"] for r in reports] == ["1"]
    assert len(orthanc_instances(orthanc, str(source.StudyInstanceUID), COMPREHENSIVE_3D_SR)) == 1
    assert len(ris.messages) == 1


def test_the_cat_is_refused_recorded_and_sent_nowhere(node, orthanc, ris, samples):  # noqa: F811
    if samples.cat is None:
        pytest.skip("the cat radiograph (shared data dicom/) is not here")
    proc, dicom_port = node
    fhir = httpx.Client(base_url=f"{proc.base}/fhir", timeout=30)
    cat_uid = str(pydicom.dcmread(samples.cat, stop_before_pixels=True).StudyInstanceUID)
    studies_before, oru_before = set(orthanc.get("/studies").json()), len(ris.messages)
    deliveries_before = {t["id"] for t in search(fhir, "Task?code=deliver")}
    storescu(dicom_port, "CXR", samples.cat)
    deadline = time.monotonic() + 120
    while not (refused := [t for t in search(fhir, f"Task?identifier=urn:dicom:uid|urn:oid:{cat_uid}")
                           if t["status"] == "failed"]):
        assert time.monotonic() < deadline, f"cat not refused: {proc.log.read_text()[-3000:]}"
        time.sleep(0.3)
    assert refused[0]["businessStatus"]["text"] == "refused" and "chest radiograph" in refused[0]["statusReason"]["text"]
    [cat_study] = search(fhir, f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{cat_uid}")
    assert search(fhir, f"DiagnosticReport?study=ImagingStudy/{cat_study['id']}") == []
    time.sleep(3)
    assert {t["id"] for t in search(fhir, "Task?code=deliver")} == deliveries_before  # none was queued
    assert set(orthanc.get("/studies").json()) == studies_before and len(ris.messages) == oru_before


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """SQLite (the default), and PostgreSQL as deploy/compose.yaml runs it: migrated once by
    `cxr db upgrade` before the API and the worker start (CXR_DB_AUTO_UPGRADE=false)."""
    if request.param == "sqlite":
        yield {}
        return
    from pg_cluster import POSTGRES_URL, fresh_postgres_database

    if not POSTGRES_URL:
        pytest.skip("CXR_TEST_POSTGRES_URL not set")
    with fresh_postgres_database("cxr_e2e") as url:
        env = {"CXR_DATABASE_URL": url, "CXR_DB_AUTO_UPGRADE": "false"}
        r = subprocess.run([sys.executable, "-m", "fhir_server", "db", "upgrade"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=server_env(tmp_path, **env))
        assert r.returncode == 0, r.stdout + r.stderr
        yield env


def test_cxr_worker_receives_analyses_and_delivers(orthanc, samples, database, tmp_path, capsys):  # noqa: F811
    """deploy/compose.yaml's split: the API replica runs no jobs and no DICOM listener; the worker
    runs both. A study sent to the worker's DICOM port is analysed and delivered the same way."""
    ris = Listener(["AA"] * 5)
    data = tmp_path / "data"
    data.mkdir()
    dicom_port = free_port()
    env = node_env(data, orthanc, ris, samples, dicom_port, **database)
    api_env = {**{k: v for k, v in env.items() if k != "CXR_DICOM_PORT"}, "CXR_QUEUE_WORKER": "false"}
    api = start_serve(api_env, data / "api.log")
    worker = Proc(["worker"], env, data / "worker.log")
    try:
        api.wait_ready(timeout=240)
        deadline = time.monotonic() + 240
        while subprocess.run([shutil.which("echoscu") or "echoscu", "-aec", "CXR", "127.0.0.1", str(dicom_port)],
                             capture_output=True).returncode != 0:
            assert worker.popen.poll() is None, f"cxr worker exited: {worker.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the worker's DICOM listener did not come up"
            time.sleep(0.5)
        # a new study (new UIDs) from the same film, so it does not collide with the serve test's
        ds = pydicom.dcmread(samples.human)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        path = tmp_path / "worker-study.dcm"
        ds.save_as(path, enforce_file_format=True)
        fhir = httpx.Client(base_url=f"{api.base}/fhir", timeout=30)
        send_and_check("cxr worker", fhir, orthanc, ris, path, dicom_port, worker.log, capsys)
    finally:
        worker.stop()
        api.stop()
        ris.close()


def test_two_view_study_reports_once_and_delivers_what_was_analysed(node, orthanc, ris, samples, tmp_path):  # noqa: F811
    """PA + lateral in one study (the lateral a re-tagged copy of the film): one report (LOINC
    36643-5, two views), the SR and SCs only for the analysed frontal image, one more ORU."""
    proc, dicom_port = node
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = []
    for i, view in enumerate(("PA", "LL"), 1):
        ds = pydicom.dcmread(samples.human)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.ViewPosition, ds.InstanceNumber, ds.AccessionNumber = view, i, "ACC-E2E-2V"
        paths.append(tmp_path / f"{view}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    frontal = pydicom.dcmread(paths[0], stop_before_pixels=True)
    oru_before = len(ris.messages)
    storescu(orthanc.dicom_port, orthanc.aet, *paths)
    storescu(dicom_port, "CXR", *paths)
    fhir = httpx.Client(base_url=f"{proc.base}/fhir", timeout=30)
    deadline = time.monotonic() + DELIVERY_BOUND_S
    while len(ris.answered) <= oru_before or not orthanc_instances(orthanc, study, COMPREHENSIVE_3D_SR):
        assert time.monotonic() < deadline, f"not delivered: {proc.log.read_text()[-3000:]}"
        time.sleep(0.3)
    [report] = search(fhir, f"DiagnosticReport?study.identifier=urn:dicom:uid|urn:oid:{study}")
    assert report["code"]["coding"][0]["code"] == "36643-5"
    [sr] = orthanc_instances(orthanc, study, COMPREHENSIVE_3D_SR)
    refs = [r.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
            for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence]
    assert refs == [frontal.SOPInstanceUID]
    time.sleep(2)
    heatmaps = [d for d in orthanc_instances(orthanc, study, SECONDARY_CAPTURE) if d.SeriesInstanceUID != series]
    assert heatmaps and all(d.SourceImageSequence[0].ReferencedSOPInstanceUID == frontal.SOPInstanceUID for d in heatmaps)
    assert len(ris.messages) == oru_before + 1
    msg = parse_message(ris.messages[-1], find_groups=True)
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_4.to_er7().startswith("36643-5^") and order.obr.obr_19.value == study


def test_destinations_down_when_the_study_arrives_get_the_result_when_they_return(samples, tmp_path):
    """The PACS and the RIS are both down: the report is stored, both deliveries wait (Task
    in-progress, the last error recorded), and each is delivered once its destination is back."""
    from orthanc_support import AE_TITLE, start_orthanc

    pacs_port, ris_port, dicom_port = free_port(), free_port(), free_port()
    data = tmp_path / "data"
    data.mkdir()
    env = server_env(data, **samples.model_env, CXR_DICOM_PORT=str(dicom_port),
                     CXR_DICOM_DESTINATION=f"{AE_TITLE}@127.0.0.1:{pacs_port}", CXR_HL7_DESTINATION=f"127.0.0.1:{ris_port}",
                     CXR_DICOM_STUDY_SETTLE_S="1", CXR_QUEUE_POLL_S="0.3", CXR_DELIVERY_BACKOFF_S="1",
                     CXR_DELIVERY_BACKOFF_MAX_S="4", CXR_DICOM_TIMEOUT_S="5", CXR_HL7_ACK_TIMEOUT_S="3")
    proc = start_serve(env, data / "serve.log")
    pacs = ris = None
    try:
        proc.wait_ready(timeout=240)
        fhir = httpx.Client(base_url=f"{proc.base}/fhir", timeout=30)
        source = pydicom.dcmread(samples.human, stop_before_pixels=True)
        storescu(dicom_port, "CXR", samples.human)
        deadline = time.monotonic() + DELIVERY_BOUND_S
        while True:
            tasks = search(fhir, "Task?code=deliver")
            if len(tasks) == 2 and all(t.get("statusReason") for t in tasks):
                break
            assert time.monotonic() < deadline, f"no failed attempt recorded: {tasks}; {proc.log.read_text()[-2000:]}"
            time.sleep(0.3)
        assert {t["status"] for t in tasks} == {"in-progress"}  # retrying, not failed: nothing is lost
        [report] = search(fhir, f"DiagnosticReport?study.identifier=urn:dicom:uid|urn:oid:{source.StudyInstanceUID}")

        pacs = start_orthanc(tmp_path / "pacs", dicom_port=pacs_port)
        ris = Listener(["AA"], port=ris_port)
        deadline = time.monotonic() + DELIVERY_BOUND_S
        while True:
            tasks = search(fhir, f"Task?focus=DiagnosticReport/{report['id']}")
            if len(tasks) == 2 and all(t["status"] == "completed" for t in tasks):
                break
            assert time.monotonic() < deadline, f"not delivered after the outage: {tasks}"
            time.sleep(0.5)
        assert len(orthanc_instances(pacs, str(source.StudyInstanceUID), COMPREHENSIVE_3D_SR)) == 1
        assert len(ris.messages) == 1 and [a for a, _ in ris.answered] == ["AA"]
    finally:
        proc.stop()
        if pacs is not None:
            pacs.stop()
        if ris is not None:
            ris.close()
