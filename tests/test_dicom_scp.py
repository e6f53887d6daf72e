"""The DICOM listener inside a live server, driven by dcmtk's storescu / echoscu (real DICOM over
loopback TCP): durable receipt, one analysis per settled study, the FHIR side, refusals."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from dicom_support import (
    CR_SOP, CT_SOP, DX_PROC_SOP, dicom_server, echoscu, jobs, make_file, need, scp_port, storescu, wait_done,
)
from analyze_support import wait_until
from live_server import tiny_test_analyzer

from fhir_server.dicom.tables import DicomInstance

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need("storescu")
    analyzer = tiny_test_analyzer()
    try:
        # 3 s of quiet settles a study: storescu's own start-up on a loaded CI machine must not
        # split a study sent in two calls into two analyses
        with dicom_server(tmp_path_factory.mktemp("cxr-dicom"), analyzer=analyzer, dicom_study_settle_s=3.0) as srv:
            yield srv
    finally:
        if analyzer is not None:
            analyzer.close()


def fhir(server) -> httpx.Client:
    return httpx.Client(base_url=server.fhir_base, timeout=30)


def search(server, query: str) -> list[dict]:
    r = fhir(server).get(f"/{query}")
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


def study_id(server, uid: str) -> str:
    found = search(server, f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}")
    assert len(found) == 1, found
    return found[0]["id"]


def test_c_echo_answers(server):
    r = echoscu(server)
    assert r.returncode == 0, r.stderr


def test_wrong_called_ae_is_rejected(server):
    r = echoscu(server, called="NOT-US")
    assert r.returncode != 0
    assert "reject" in (r.stderr + r.stdout).lower()


def test_multi_instance_study_settles_into_one_analysis(server, tmp_path):
    study, series = "1.2.826.0.1.3680043.10.543.1", "1.2.826.0.1.3680043.10.543.1.1"
    pa = make_file(tmp_path, study, series, f"{series}.1", view="PA", modality="DX")
    lat = make_file(tmp_path, study, series, f"{series}.2", view="LL", modality="DX")
    cr = make_file(tmp_path, study, "1.2.826.0.1.3680043.10.543.1.2", "1.2.826.0.1.3680043.10.543.1.2.1",
                   view="AP", modality="CR", sop_class=CR_SOP, quadrant="bottom_right")
    assert storescu(server, pa).returncode == 0
    time.sleep(0.6)  # inside the settle window: the study must not be analysed with one image only
    r = storescu(server, lat, cr)
    assert r.returncode == 0, r.stderr
    row = wait_done(server, study)
    assert row.state == "analysed" and row.revision == 3
    def finished() -> list:
        mine = [j for j in jobs(server, "dicom.analyze_study") if j.payload["study_uid"] == study]
        return mine if all(j.status == "done" for j in mine) else []

    runs = [j for j in wait_until(finished) if "report" in (j.result or {})]
    assert len(runs) == 1, runs  # one analysis for the three instances

    sid = study_id(server, study)
    img = fhir(server).get(f"/ImagingStudy/{sid}").json()
    assert img["numberOfInstances"] == 3 and img["numberOfSeries"] == 2
    assert {m["code"] for m in img["modality"]} == {"DX", "CR"}
    assert img["started"].startswith("2024-05-01T10:15:00")
    assert {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": "ACC-1"} in img["identifier"]
    patient = fhir(server).get(f"/{img['subject']['reference']}").json()
    assert patient["identifier"][0]["value"] == "PAT-1" and patient["gender"] == "female"
    assert patient["birthDate"] == "1970-01-02" and patient["name"][0] == {"family": "Doe", "given": ["Jane"]}

    reports = search(server, f"DiagnosticReport?study=ImagingStudy/{sid}")
    assert len(reports) == 1 and reports[0]["status"] == "preliminary"
    chained = search(server, f"DiagnosticReport?study.identifier=urn:dicom:uid|urn:oid:{study}")
    assert [r["id"] for r in chained] == [reports[0]["id"]]
    system = patient["identifier"][0]["system"]
    by_patient = search(server, f"DiagnosticReport?patient.identifier={system}|PAT-1")
    assert reports[0]["id"] in {r["id"] for r in by_patient}
    assert search(server, f"Provenance?target=DiagnosticReport/{reports[0]['id']}")
    task = search(server, f"Task?focus=ImagingStudy/{sid}")
    assert [t["status"] for t in task] == ["completed"]

    # the delivery hand-off: enqueued in the report's transaction, with the analysed (frontal) files
    deliveries = [j for j in jobs(server, "results.deliver") if j.payload["study_uid"] == study]
    assert len(deliveries) == 1
    job = deliveries[0]
    assert job.payload["report"] == f"DiagnosticReport/{reports[0]['id']}"
    assert job.payload["imaging_study"] == f"ImagingStudy/{sid}"
    assert job.dedupe_key == f"results.deliver:{reports[0]['id']}:1"
    paths = job.payload["instances"]
    assert sorted(Path(p).name for p in paths) == sorted([pa.name, cr.name])  # not the lateral
    for p in paths:
        assert Path(p).is_absolute() and pydicom.dcmread(p).StudyInstanceUID == study

    # sending the same study again changes nothing: no job, no new report version
    assert storescu(server, pa, lat, cr).returncode == 0
    time.sleep(server.app.state.settings.dicom_study_settle_s + 1.0)
    assert wait_done(server, study).revision == 3
    assert fhir(server).get(f"/DiagnosticReport/{reports[0]['id']}").json()["meta"]["versionId"] == "1"
    assert len([j for j in jobs(server, "results.deliver") if j.payload["study_uid"] == study]) == 1

    # a new instance changes the study: re-analysed once, the report gets version 2
    extra = make_file(tmp_path, study, series, f"{series}.3", view="PA", quadrant="top_right")
    assert storescu(server, extra).returncode == 0
    row = wait_done(server, study, revision=4)
    assert row.state == "analysed"
    assert fhir(server).get(f"/DiagnosticReport/{reports[0]['id']}").json()["meta"]["versionId"] == "2"
    assert fhir(server).get(f"/ImagingStudy/{sid}").json()["numberOfInstances"] == 4
    keys = sorted(j.dedupe_key for j in jobs(server, "results.deliver") if j.payload["study_uid"] == study)
    assert keys == [f"results.deliver:{reports[0]['id']}:1", f"results.deliver:{reports[0]['id']}:2"]
    assert len(search(server, f"DiagnosticReport?study=ImagingStudy/{sid}")) == 1


def test_unsupported_sop_class_gets_a_refusal_status_and_the_association_goes_on(server, tmp_path, capsys):
    from fhir_server.cli import main

    study = "1.2.826.0.1.3680043.10.543.2"
    ct = make_file(tmp_path, study, f"{study}.1", f"{study}.1.1", modality="CT", sop_class=CT_SOP)
    dx = make_file(tmp_path, study, f"{study}.2", f"{study}.2.1", sop_class=DX_PROC_SOP)
    rc = main(["dicom", "send", str(ct), str(dx), "--to", f"CXR@127.0.0.1:{scp_port(server)}"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "0x0122" in out and "SOP Class Not Supported" in out
    assert f"OK       {dx}" in out and "1 stored, 1 not stored" in out
    with server.app.state.store.transaction(write=False) as tx:
        assert tx.session.get(DicomInstance, f"{study}.1.1") is None
        assert tx.session.get(DicomInstance, f"{study}.2.1") is not None
    assert wait_done(server, study).state == "analysed"


def test_corrupt_pixel_data_is_kept_and_recorded_as_refused(server, tmp_path):
    study = "1.2.826.0.1.3680043.10.543.3"
    path = make_file(tmp_path, study, f"{study}.1", f"{study}.1.1")
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # truncated pixels, valid header
    ds.save_as(path, enforce_file_format=True)
    r = storescu(server, path)
    assert r.returncode == 0, r.stderr  # received and kept: nothing lost
    row = wait_done(server, study)
    assert row.state == "refused"
    sid = study_id(server, study)
    assert search(server, f"DiagnosticReport?study=ImagingStudy/{sid}") == []
    tasks = search(server, f"Task?focus=ImagingStudy/{sid}&status=failed")
    assert len(tasks) == 1 and "pixel" in tasks[0]["statusReason"]["text"].lower()
    assert echoscu(server).returncode == 0


def test_lateral_only_study_is_refused_without_report(server, tmp_path):
    study = "1.2.826.0.1.3680043.10.543.4"
    r = storescu(server, make_file(tmp_path, study, f"{study}.1", f"{study}.1.1", view="LATERAL"))
    assert r.returncode == 0
    assert wait_done(server, study).state == "refused"
    sid = study_id(server, study)
    [task] = search(server, f"Task?focus=ImagingStudy/{sid}")
    assert task["status"] == "failed" and "frontal" in task["statusReason"]["text"]


def test_association_dropped_mid_transfer_loses_nothing(server, tmp_path):
    from pynetdicom import AE

    study = "1.2.826.0.1.3680043.10.543.5"
    path = make_file(tmp_path, study, f"{study}.1", f"{study}.1.1", size=256)
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="DROPPER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp_port(server), ae_title="CXR")
    assert assoc.is_established
    raw = assoc.dul.socket.socket

    def cut(data: bytes) -> None:  # half of the data set's PDU, then the TCP connection just goes
        if len(data) > 10_000:
            raw.sendall(data[: len(data) // 2])
            raw.shutdown(socket.SHUT_RDWR)
            raw.close()
            return
        raw.sendall(data)

    assoc.dul.socket.send = cut
    try:
        assoc.send_c_store(ds)
    except Exception:  # noqa: BLE001 - the sender sees its own cut
        pass
    assoc.abort()
    time.sleep(0.5)
    with server.app.state.store.transaction(write=False) as tx:
        assert tx.session.get(DicomInstance, f"{study}.1.1") is None  # a half instance is not stored
    assert echoscu(server).returncode == 0  # the listener is still there
    assert storescu(server, path).returncode == 0  # and the resend goes through
    assert wait_done(server, study).state == "analysed"


def test_received_files_are_complete_part10_copies(server, tmp_path):
    study = "1.2.826.0.1.3680043.10.543.6"
    path = make_file(tmp_path, study, f"{study}.1", f"{study}.1.1")
    assert storescu(server, path).returncode == 0
    with server.app.state.store.transaction(write=False) as tx:
        row = tx.session.get(DicomInstance, f"{study}.1.1")
    assert row is not None and row.calling_ae == "STORESCU"
    stored = pydicom.dcmread(row.path)
    original = pydicom.dcmread(path)
    assert stored.file_meta.MediaStorageSOPInstanceUID == f"{study}.1.1"
    assert stored.PixelData == original.PixelData and stored.PatientID == original.PatientID
    assert Path(row.path).is_relative_to(server.app.state.settings.dicom_dir.resolve())


def test_allowlist_rejects_other_calling_aes_and_size_limit_refuses_huge_instances(tmp_path):
    need("echoscu")
    with dicom_server(tmp_path / "data", analyzer=tiny_test_analyzer(), dicom_allowed_aes=["MODALITY1"],
                      dicom_max_instance_bytes=60_000) as srv:
        refused = echoscu(srv, calling="INTRUDER")
        assert refused.returncode != 0 and "reject" in (refused.stderr + refused.stdout).lower()
        assert echoscu(srv, calling="MODALITY1").returncode == 0
        study = "1.2.826.0.1.3680043.10.543.7"
        big = make_file(tmp_path, study, f"{study}.1", f"{study}.1.1", size=256)  # ~130 kB
        small = make_file(tmp_path, study, f"{study}.1", f"{study}.1.2", size=96)
        r = storescu(srv, big, calling="MODALITY1")
        assert "refused: outofresources" in (r.stderr + r.stdout).lower()  # 0xA700
        assert storescu(srv, small, calling="MODALITY1").returncode == 0
        with srv.app.state.store.transaction(write=False) as tx:
            assert tx.session.get(DicomInstance, f"{study}.1.1") is None
            assert tx.session.get(DicomInstance, f"{study}.1.2") is not None
        assert wait_done(srv, study).state == "analysed"


def test_a_settling_study_is_analysed_after_a_restart(tmp_path):
    study = "1.2.826.0.1.3680043.10.543.8"
    path = make_file(tmp_path, study, f"{study}.1", f"{study}.1.1")
    data = tmp_path / "data"
    with dicom_server(data, analyzer=tiny_test_analyzer(), dicom_study_settle_s=30.0) as srv:
        assert storescu(srv, path).returncode == 0
        assert srv.app.state.dicom_store.study(study).analysed_revision == 0
    # restarted without the listener and with a shorter settle time: the queued job still runs
    with dicom_server(data, analyzer=tiny_test_analyzer(), dicom_port=None, dicom_study_settle_s=0.0) as srv:
        assert srv.app.state.dicom_scp is None
        from fhir_server.dicom.instance_store import utcnow

        def backdate() -> None:  # the job was queued to run after the first server's 30 s settle
            from sqlalchemy import update

            from fhir_server.queue.tables import QueueJob

            with srv.app.state.store.transaction() as tx:
                tx.session.execute(update(QueueJob).where(QueueJob.task == "dicom.analyze_study").values(run_after=utcnow()))

        backdate()
        assert wait_done(srv, study).state == "analysed"


SAMPLES = {  # file -> analysed? (labels.csv: the cat is not human and must be refused by the gate)
    "barre_CR-MONO1-10-chest_nometa.dcm": True,
    "feline_dx_chest_ap_deid_data.dcm": False,
    "nih_google_dx_secondary_capture_nofinding.dcm": True,
    "siim_cr_pa_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm": True,
}


def test_shared_samples_one_report_per_study_and_the_cat_refused(shared_data, bundled_model, tmp_path):
    from ml.pipeline import Analyzer

    files = [shared_data / "dicom" / name for name in SAMPLES]
    for f in files:
        if not f.exists():
            pytest.skip(f"{f} not in the shared data")
    uids = {f.name: str(pydicom.dcmread(f, stop_before_pixels=True, force=True).StudyInstanceUID) for f in files}
    analyzer = Analyzer(bundled_model, ood_gate=bundled_model.ood_gate, max_bytes=64 << 20, max_pixels=50_000_000)
    try:
        with dicom_server(tmp_path / "data", analyzer=analyzer) as srv:
            r = storescu(srv, *files)
            assert r.returncode == 0, r.stderr
            for name, analysed in SAMPLES.items():
                row = wait_done(srv, uids[name], timeout=120)
                assert row.state == ("analysed" if analysed else "refused"), (name, row.reason)
                sid = study_id(srv, uids[name])
                reports = search(srv, f"DiagnosticReport?study=ImagingStudy/{sid}")
                assert len(reports) == (1 if analysed else 0), name
                tasks = search(srv, f"Task?focus=ImagingStudy/{sid}")
                assert [t["status"] for t in tasks] == ["completed" if analysed else "failed"]
                if not analysed:
                    assert "chest radiograph" in tasks[0]["statusReason"]["text"]
            nih = search(srv, "DiagnosticReport?patient.identifier=Covid0000")
            assert len(nih) == 1
            assert len(search(srv, "DiagnosticReport")) == 3
            # the whole set again: nothing is analysed twice
            assert storescu(srv, *files).returncode == 0
            time.sleep(srv.app.state.settings.dicom_study_settle_s + 1.5)
            assert all(r["meta"]["versionId"] == "1" for r in search(srv, "DiagnosticReport"))
            assert len(search(srv, "DiagnosticReport")) == 3
            assert len(jobs(srv, "results.deliver")) == 3
    finally:
        analyzer.close()


def test_compressed_instances_are_received_in_their_own_transfer_syntax(server, tmp_path, capsys):
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from fhir_server.cli import main

    study = "1.2.826.0.1.3680043.10.543.9"
    paths = []
    for i, syntax in enumerate((JPEG2000Lossless, RLELossless), 1):
        path = make_file(tmp_path, study, f"{study}.1", f"{study}.1.{i}")
        ds = pydicom.dcmread(path)
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    assert main(["dicom", "send", *map(str, paths), "--to", f"CXR@127.0.0.1:{scp_port(server)}"]) == 0
    assert "2 stored, 0 not stored" in capsys.readouterr().out
    with server.app.state.store.transaction(write=False) as tx:
        rows = [tx.session.get(DicomInstance, f"{study}.1.{i}") for i in (1, 2)]
    assert [r.transfer_syntax for r in rows] == [JPEG2000Lossless, RLELossless]
    assert pydicom.dcmread(rows[0].path).file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert wait_done(server, study).state == "analysed"
    sid = study_id(server, study)
    [report] = search(server, f"DiagnosticReport?study=ImagingStudy/{sid}")
    assert len(report["presentedForm"]) == 2  # both decoded and analysed


def test_a_transfer_syntax_ingest_cannot_decode_is_not_negotiated(server, tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title="DEFLATER")
    ae.add_requested_context(DX_PROC_SOP, [DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(CR_SOP, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp_port(server), ae_title="CXR")
    try:
        assert assoc.is_established  # the association stands; only that context is refused
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
        assert accepted == {(CR_SOP, ExplicitVRLittleEndian)}
        assert [str(c.abstract_syntax) for c in assoc.rejected_contexts] == [DX_PROC_SOP]
    finally:
        assoc.release()
