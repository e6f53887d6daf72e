"""The DICOM intake's pieces without the network: durable receipt + settle scheduling (on SQLite,
and PostgreSQL when CXR_TEST_POSTGRES_URL is set) and the DICOM -> Patient / ImagingStudy mapping."""

from __future__ import annotations

import threading
from datetime import timedelta

import pydicom
import pytest
from fhir_support import BACKENDS, make_repo
from pydicom.dataset import Dataset
from sqlalchemy import select, text, update

from fhir_server.dicom.fhir_side import (
    InstanceHeader, _started, build_imaging_study, build_patient, patient_identifier, upsert_imaging_study,
)
from fhir_server.dicom.instance_store import InstanceStore, content_digest, job_key, utcnow
from fhir_server.dicom.tables import create_dicom_tables
from fhir_server.queue.store import create_queue_table
from fhir_server.queue.tables import QueueJob

STUDY = "1.2.826.0.1.3680043.10.547.1"


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    repo = make_repo(request.param, tmp_path, schema="dicomin_units")
    create_dicom_tables(repo.engine)
    create_queue_table(repo.engine)
    if request.param == "postgres":
        with repo.engine.begin() as conn:
            conn.execute(text("TRUNCATE dicom_instance, dicom_study, queue_job"))
    yield InstanceStore(repo, tmp_path / "dicom", settle_s=5.0)
    if request.param == "sqlite":
        repo.dispose()


def save(store: InstanceStore, sop: str, data: bytes = b"DICM-bytes", **kw):
    return store.save(data, study_uid=kw.pop("study", STUDY), series_uid=f"{STUDY}.1", sop_uid=sop,
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax="1.2.840.10008.1.2.1", **kw)


def queued(store: InstanceStore) -> list[QueueJob]:
    with store.repo.transaction(write=False) as tx:
        return list(tx.session.execute(select(QueueJob).order_by(QueueJob.created)).scalars())


def test_receipt_is_durable_and_schedules_one_settle_job(store):
    first = save(store, f"{STUDY}.1.1", b"one")
    assert first.outcome == "new" and first.path.read_bytes() == b"one"
    assert first.path.parent == store.root / STUDY
    assert not [p for p in first.path.parent.iterdir() if p.name.endswith(".tmp")]
    save(store, f"{STUDY}.1.2", b"two")
    study = store.study(STUDY)
    assert study.revision == 2 and study.jobs == 1
    [job] = queued(store)
    assert job.task == "dicom.analyze_study" and job.dedupe_key == job_key(STUDY, 1)
    assert job.run_after > utcnow() + timedelta(seconds=3)  # settle_s in the future

    assert save(store, f"{STUDY}.1.1", b"one").outcome == "duplicate"
    assert store.study(STUDY).revision == 2
    changed = save(store, f"{STUDY}.1.1", b"one, corrected")
    assert changed.outcome == "changed" and changed.path.read_bytes() == b"one, corrected"
    assert store.study(STUDY).revision == 3
    assert len(queued(store)) == 1
    assert [i.sop_uid for i in store.instances(STUDY)] == [f"{STUDY}.1.2", f"{STUDY}.1.1"]


def test_a_running_settle_job_does_not_cover_new_content(store):
    save(store, f"{STUDY}.1.1")
    with store.repo.transaction() as tx:
        tx.session.execute(update(QueueJob).values(status="running"))
    save(store, f"{STUDY}.1.2")
    assert [j.dedupe_key for j in queued(store)] == [job_key(STUDY, 1), job_key(STUDY, 2)]


def test_own_results_routed_back_are_kept_but_not_analysed(store):
    save(store, f"{STUDY}.1.1")
    receipt = save(store, f"{STUDY}.9.1", b"our SC", own_output=True)
    assert receipt.path.exists()
    assert [i.sop_uid for i in store.instances(STUDY)] == [f"{STUDY}.1.1"]
    assert store.study(STUDY).revision == 1


def test_bad_uids_never_name_a_file(store):
    for bad in ("../../etc", "1.2.3/4", "", "1" * 65):
        with pytest.raises(ValueError):
            save(store, bad)
    assert not store.root.exists() or not any(store.root.rglob("*"))


def test_concurrent_associations_add_to_one_study(store):
    errors = []

    def send(i: int) -> None:
        try:
            save(store, f"{STUDY}.1.{i + 1}", f"image {i}".encode())
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.study(STUDY).revision == 6 and len(store.instances(STUDY)) == 6
    assert len(queued(store)) == 1


# ---------------------------------------------------------------------------------- FHIR side


def ds(**tags) -> Dataset:
    d = Dataset()
    d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID = STUDY, f"{STUDY}.1", f"{STUDY}.1.1"
    d.SOPClassUID, d.Modality = "1.2.840.10008.5.1.4.1.1.1", "CR"
    for k, v in tags.items():
        setattr(d, k, v)
    return d


def test_patient_identifier_follows_the_issuer():
    assert patient_identifier(ds()) is None
    assert patient_identifier(ds(PatientID="42"))["system"] == "http://cxr-fhir.org/fhir/identifier/dicom-patient-id"
    assert patient_identifier(ds(PatientID="42", IssuerOfPatientID="1.2.40.0.10.1.4.3.1.1"))["system"] == \
        "urn:oid:1.2.40.0.10.1.4.3.1.1"
    assert patient_identifier(ds(PatientID="42", IssuerOfPatientID="urn:example:mrn"))["system"] == "urn:example:mrn"
    local = patient_identifier(ds(PatientID="42", IssuerOfPatientID="St Mary's"))
    assert local["system"].endswith("/St%20Mary%27s") and local["assigner"] == {"display": "St Mary's"}
    q = Dataset()
    q.UniversalEntityID, q.UniversalEntityIDType = "2.16.840.1.113883.3.1", "ISO"
    qualified = ds(PatientID="42", IssuerOfPatientID="HOSP", IssuerOfPatientIDQualifiersSequence=[q])
    assert patient_identifier(qualified)["system"] == "urn:oid:2.16.840.1.113883.3.1"


def test_patient_from_the_patient_module():
    p = build_patient(ds(PatientID="42", PatientName="Smith^John^Paul^Dr^Jr", PatientSex="M", PatientBirthDate="19800230"))
    assert p["name"] == [{"family": "Smith", "given": ["John", "Paul"], "prefix": ["Dr"], "suffix": ["Jr"]}]
    assert p["gender"] == "male" and "birthDate" not in p  # 30 February: not a date, left out
    assert build_patient(ds(PatientName="", PatientSex="X")) == {"resourceType": "Patient"}


def test_started_carries_a_zone():
    assert _started(ds(StudyDate="20240501", StudyTime="101500.123", TimezoneOffsetFromUTC="+0200")) == \
        "2024-05-01T10:15:00+02:00"
    local = _started(ds(StudyDate="20240501", StudyTime="1015"))
    assert local.startswith("2024-05-01T10:15:00") and len(local) > 19
    assert _started(ds(StudyDate="20240501")) == "2024-05-01"
    assert _started(ds(StudyDate="garbage")) is None


def test_imaging_study_keeps_what_it_does_not_own():
    existing = {"resourceType": "ImagingStudy", "id": "x", "status": "registered",
                "subject": {"reference": "Patient/ehr"},
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}, {"system": "urn:ris", "value": "R1"}],
                "endpoint": [{"reference": "Endpoint/pacs"}]}
    headers = [InstanceHeader(ds(AccessionNumber="A9", SeriesNumber=2, InstanceNumber=1), "/x.dcm")]
    out = build_imaging_study(STUDY, headers, "Patient/ehr", existing)
    assert out["endpoint"] == [{"reference": "Endpoint/pacs"}] and out["status"] == "available"
    assert {"system": "urn:ris", "value": "R1"} in out["identifier"]
    assert out["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}
    assert out["series"][0]["number"] == 2 and out["series"][0]["instance"][0]["number"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_upsert_matches_the_ehr_patient_and_does_not_version_an_unchanged_study(backend, tmp_path):
    repo = make_repo(backend, tmp_path, schema="dicomin_units_fhir")
    ehr = repo.create({"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN1"}],
                       "name": [{"family": "FromEHR"}]})
    headers = [InstanceHeader(ds(PatientID="MRN1", IssuerOfPatientID="1.2.3", PatientName="Modality^Copy"), "/x.dcm")]
    with repo.transaction() as tx:
        study, patient = upsert_imaging_study(tx, STUDY, headers)
    assert patient.id == ehr.id and study.resource["subject"] == {"reference": f"Patient/{ehr.id}"}
    with repo.transaction() as tx:
        again, _ = upsert_imaging_study(tx, STUDY, headers)
    assert (again.id, again.version_id) == (study.id, study.version_id)
    more = [*headers, InstanceHeader(ds(PatientID="MRN1", IssuerOfPatientID="1.2.3", SOPInstanceUID=f"{STUDY}.1.2"), "/y.dcm")]
    with repo.transaction() as tx:
        changed, _ = upsert_imaging_study(tx, STUDY, more)
    assert changed.id == study.id and changed.version_id == study.version_id + 1
    assert changed.resource["numberOfInstances"] == 2


def test_pydicom_reads_what_the_store_wrote(tmp_path):
    # the files are Part 10 with meta: what `read_headers` and every DICOM tool expect
    d = ds(PatientID="1")
    d.file_meta = pydicom.dataset.FileMetaDataset()
    d.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    d.file_meta.MediaStorageSOPClassUID, d.file_meta.MediaStorageSOPInstanceUID = d.SOPClassUID, d.SOPInstanceUID
    path = tmp_path / "x.dcm"
    d.save_as(path, enforce_file_format=True)
    from fhir_server.dicom.intake import read_headers

    headers, notes = read_headers([str(path), str(tmp_path / "missing.dcm")])
    assert [h.get("PatientID") for h in headers] == ["1"] and len(notes) == 1


def test_frontal_selection_uses_view_position_and_laterality():
    from fhir_server.dicom.intake import select_images

    cases = {
        "1": ds(SOPInstanceUID=f"{STUDY}.1.1", ViewPosition="PA"),
        "2": ds(SOPInstanceUID=f"{STUDY}.1.2", ViewPosition="LL"),
        "3": ds(SOPInstanceUID=f"{STUDY}.1.3", ImageLaterality="L"),  # one side, no view: skipped
        "4": ds(SOPInstanceUID=f"{STUDY}.1.4", ViewPosition="AP", ImageLaterality="R"),  # view wins
        "5": ds(SOPInstanceUID=f"{STUDY}.1.5"),  # nothing recorded: the gate decides
    }
    chosen = select_images([InstanceHeader(d, f"/{k}.dcm") for k, d in cases.items()])
    assert [i.ref.sop_uid.rsplit(".", 1)[1] for i in chosen.images] == ["1", "4", "5"]
    assert len(chosen.notes) == 2 and "laterality L" in chosen.notes[1]
    many = select_images([InstanceHeader(ds(SOPInstanceUID=f"{STUDY}.2.{i}", ViewPosition="PA"), "/x") for i in range(20)])
    assert len(many.images) == 16 and "16 of 20" in many.notes[-1]


def test_content_digest_ignores_the_encoding_and_sees_every_change(tmp_path):
    """A PACS forwarding an instance re-encodes it (lengths, delimiters, padding, OB/OW, another
    little-endian transfer syntax): the same instance, so no second report; any value change is not."""
    import io

    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    def make() -> Dataset:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4.5"
        ds.PatientName, ds.StudyDate, ds.ViewPosition = "Doe^Jane", "20240501", "PA"
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "399348003", "SCT", "PA"
        ds.ViewCodeSequence = Sequence([item])
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 2, 16, 12, 11
        ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
        ds.PixelData = bytes(range(8))
        return ds

    def roundtrip(ds: Dataset, syntax: str, *, undefined_sq: bool, pixel_vr: str) -> Dataset:
        ds = Dataset(ds)
        ds["PixelData"].VR = pixel_vr
        ds["ViewCodeSequence"].is_undefined_length = undefined_sq
        buf = io.BytesIO()
        ds.save_as(buf, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
        return pydicom.dcmread(io.BytesIO(buf.getvalue()), force=True)

    base = make()
    encodings = [roundtrip(base, ExplicitVRLittleEndian, undefined_sq=True, pixel_vr="OW"),
                 roundtrip(base, ExplicitVRLittleEndian, undefined_sq=False, pixel_vr="OB"),
                 roundtrip(base, ImplicitVRLittleEndian, undefined_sq=True, pixel_vr="OW")]
    assert len({content_digest(d) for d in [base, *encodings]}) == 1
    changed = make()
    changed.ViewPosition = "AP"
    pixels = make()
    pixels.PixelData = bytes(range(1, 9))
    item = make()
    item.ViewCodeSequence[0].CodeMeaning = "AP"
    assert len({content_digest(d) for d in (base, changed, pixels, item)}) == 4
