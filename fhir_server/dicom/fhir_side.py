"""DICOM headers of a received study -> its FHIR Patient and ImagingStudy (pure, no I/O), and the
upsert that matches them against what the FHIR store already holds.

Patient: matched by identifier (PatientID in the system its IssuerOfPatientID names), else created
from the patient module. ImagingStudy: matched by identifier urn:dicom:uid|urn:oid:<StudyUID> (an
EHR may have created it, with an Endpoint), else created at an id derived from the UID, so a study
that changes is versioned, never duplicated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from pydicom.dataset import Dataset

from fhir_server.resources import stable_id
from fhir_server.storage import StoredResource, Transaction

Json = dict[str, Any]
DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PATIENT_ID_SYSTEM = "http://cxr-fhir.org/fhir/identifier/dicom-patient-id"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_SEX = {"M": "male", "F": "female", "O": "other"}


@dataclass(frozen=True)
class InstanceHeader:
    """What the FHIR side needs of one received instance (read without its pixels)."""

    ds: Dataset
    path: str

    def get(self, keyword: str) -> str:
        value = self.ds.get(keyword)
        return "" if value is None else str(value).strip()


def study_identifier(study_uid: str) -> Json:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}


def patient_identifier(ds: Dataset) -> Json | None:
    """PatientID in the namespace of its issuer (OID -> urn:oid, URI as is, else a local system)."""
    pid = str(ds.get("PatientID") or "").strip()
    if not pid:
        return None
    issuer = str(ds.get("IssuerOfPatientID") or "").strip()
    for q in ds.get("IssuerOfPatientIDQualifiersSequence") or []:
        universal = str(q.get("UniversalEntityID") or "").strip()
        if universal and str(q.get("UniversalEntityIDType") or "").upper() == "ISO" and _OID.match(universal):
            issuer = universal
    if not issuer:
        system = PATIENT_ID_SYSTEM
    elif _OID.match(issuer):
        system = f"urn:oid:{issuer}"
    elif re.match(r"^(urn:|https?://)", issuer):
        system = issuer
    else:
        system = f"{PATIENT_ID_SYSTEM}/{quote(issuer, safe='')}"
    ident: Json = {"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "MR"}]}, "system": system, "value": pid}
    if issuer:
        ident["assigner"] = {"display": issuer}
    return ident


def _date(value: str) -> str | None:
    try:
        return datetime.strptime(value.strip(), "%Y%m%d").date().isoformat() if len(value.strip()) == 8 else None
    except ValueError:  # 19800230 and other impossible dates are left out, not guessed
        return None


def _human_name(pn: str) -> Json | None:
    parts = [p.strip() for p in pn.split("=")[0].split("^")]  # alphabetic group only
    family, given, middle, prefix, suffix = (parts + [""] * 5)[:5]
    name: Json = {}
    if family:
        name["family"] = family
    givens = [g for g in (given, *middle.split()) if g]
    if givens:
        name["given"] = givens
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name or None


def build_patient(ds: Dataset) -> Json:
    data: Json = {"resourceType": "Patient"}
    ident = patient_identifier(ds)
    if ident:
        data["identifier"] = [ident]
    name = _human_name(str(ds.get("PatientName") or ""))
    if name:
        data["name"] = [name]
    gender = _SEX.get(str(ds.get("PatientSex") or "").strip().upper())
    if gender:
        data["gender"] = gender
    birth = _date(str(ds.get("PatientBirthDate") or ""))
    if birth:
        data["birthDate"] = birth
    return Patient.model_validate(data).model_dump(mode="json")


def _started(ds: Dataset) -> str | None:
    """StudyDate/StudyTime as a FHIR dateTime. DICOM times carry no zone: TimezoneOffsetFromUTC
    when sent, else the server's own zone (a DICOM node runs where its modalities are)."""
    date = str(ds.get("StudyDate") or ds.get("SeriesDate") or ds.get("AcquisitionDate") or "").strip()
    if not _date(date):
        return None
    time = str(ds.get("StudyTime") or "").strip().split(".")[0]
    if not re.match(r"^\d{2}(\d{2}(\d{2})?)?$", time):
        return _date(date)
    time = (time + "0000")[:6]
    try:
        local = datetime.strptime(date + time, "%Y%m%d%H%M%S")
    except ValueError:
        return _date(date)
    offset = str(ds.get("TimezoneOffsetFromUTC") or "").strip()
    if re.match(r"^[+-]\d{4}$", offset):
        return local.strftime("%Y-%m-%dT%H:%M:%S") + f"{offset[:3]}:{offset[3:]}"
    return local.astimezone().isoformat(timespec="seconds")


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def build_imaging_study(study_uid: str, headers: Sequence[InstanceHeader], subject: str, existing: Json | None) -> Json:
    """The ImagingStudy for these instances; an existing one keeps what we do not own (endpoint,
    basedOn, referrer, extra identifiers...) and gets our series, counts, modality and subject."""
    first = headers[0].ds
    series: dict[str, Json] = {}
    modalities: dict[str, None] = {}
    for h in sorted(headers, key=lambda h: (_int(h.ds.get("SeriesNumber")) or 0, _int(h.ds.get("InstanceNumber")) or 0)):
        ds = h.ds
        modality = h.get("Modality") or "OT"
        modalities[modality] = None
        s = series.setdefault(h.get("SeriesInstanceUID"), {
            "uid": h.get("SeriesInstanceUID"),
            "modality": {"system": DCM, "code": modality},
            "instance": [],
        })
        number = _int(ds.get("SeriesNumber"))
        if number is not None and number >= 0:
            s["number"] = number
        if h.get("SeriesDescription"):
            s["description"] = h.get("SeriesDescription")
        inst: Json = {"uid": h.get("SOPInstanceUID"), "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{h.get('SOPClassUID')}"}}
        inum = _int(ds.get("InstanceNumber"))
        if inum is not None and inum >= 0:
            inst["number"] = inum
        s["instance"].append(inst)
    for s in series.values():
        s["numberOfInstances"] = len(s["instance"])
    data: Json = {k: v for k, v in (existing or {}).items() if k not in ("meta", "text")}
    idents = [i for i in data.get("identifier") or [] if i.get("system") != DICOM_UID_SYSTEM and not _is_accession(i)]
    idents.insert(0, study_identifier(study_uid))
    accession = str(first.get("AccessionNumber") or "").strip()
    if accession:
        idents.append({"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": accession})
    data.update({
        "resourceType": "ImagingStudy",
        "identifier": idents,
        "status": "available",
        "subject": {"reference": subject},
        "modality": [{"system": DCM, "code": m} for m in modalities],
        "numberOfSeries": len(series),
        "numberOfInstances": sum(len(s["instance"]) for s in series.values()),
        "series": list(series.values()),
    })
    started = _started(first)
    if started:
        data["started"] = started
    description = str(first.get("StudyDescription") or "").strip()
    if description:
        data["description"] = description
    return ImagingStudy.model_validate(data).model_dump(mode="json")


def _is_accession(ident: Json) -> bool:
    return any(c.get("code") == "ACSN" for c in (ident.get("type") or {}).get("coding") or [])


def upsert_patient(tx: Transaction, ds: Dataset, study_uid: str) -> StoredResource:
    patient = build_patient(ds)
    ident = patient_identifier(ds)
    if ident is None:
        # no PatientID: nothing to match on; one Patient per study (ImagingStudy.subject is 1..1)
        pid = stable_id("dicom-patient-without-id", study_uid)
        return tx.read_or_none("Patient", pid) or tx.create(patient, resource_id=pid)
    criteria = urlencode({"identifier": f"{ident['system']}|{ident['value']}"})
    found = tx.find("Patient", criteria, limit=2)
    if found:
        # the EHR's record wins over the modality's copy of the demographics; with duplicates
        # (a merge the EHR has not done yet) the oldest id is used, the same one every time
        return sorted(found, key=lambda p: p.id)[0]
    return tx.create(patient, resource_id=stable_id("dicom-patient", ident["system"], ident["value"]))


def upsert_imaging_study(tx: Transaction, study_uid: str, headers: Sequence[InstanceHeader]) -> tuple[StoredResource, StoredResource]:
    """(ImagingStudy, Patient) for the study, written in the caller's transaction; an unchanged
    ImagingStudy is not versioned again."""
    patient = upsert_patient(tx, headers[0].ds, study_uid)
    criteria = urlencode({"identifier": f"{DICOM_UID_SYSTEM}|urn:oid:{study_uid}"})
    matches = tx.find("ImagingStudy", criteria, limit=2)
    existing = sorted(matches, key=lambda m: m.id)[0] if matches else None
    current = existing.resource if existing is not None else None
    subject = (current or {}).get("subject", {}).get("reference") or patient.reference
    wanted = build_imaging_study(study_uid, headers, subject, current)
    if existing is not None:
        if {k: v for k, v in (current or {}).items() if k not in ("meta", "id")} == {k: v for k, v in wanted.items() if k != "id"}:
            return existing, patient
        return tx.update("ImagingStudy", existing.id, wanted), patient
    return tx.update("ImagingStudy", stable_id("dicom-imaging-study", study_uid), wanted), patient
