"""ORU^R01 (HL7 v2.5.1) of one stored analysis, built and parsed with hl7apy.

    MSH  control id (MSH-10) = hash of the report version: stable across retries, so a receiver
         that saw it before can recognise the duplicate, and a new report version is a new id
    PID  from the DICOM patient module of the source images (id, issuer, name, birth date, sex)
    OBR  OBR-3/OBR-18 accession number, OBR-19 Study Instance UID, OBR-4 the report's LOINC code
         (36554-4 for a single view), OBR-25 P (preliminary)
    OBX  1 per finding: NM probability, OBX-3 the finding code as in mappings/ (SNOMED CT and our
         local code), OBX-6 unit 1, OBX-7 "<operating point", OBX-8 A (present) / N (absent),
         OBX-11 P
    OBX  DCM 110180 Study Instance UID (ST)
    OBX  LOINC 19005-8 impression (TX): the conclusion with the "not a diagnosis" statement
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from hl7apy.core import Message
from pydicom.dataset import Dataset

import mappings
from fhir_server.dicom.result_set import FindingResult, ResultSet, scheme_designator

VERSION = "2.5.1"


def escape(text: str) -> str:
    """HL7 escape sequences for text placed in a field (the encoding characters must not leak)."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    out = out.replace("&", "\\T\\").replace("~", "\\R\\")
    return out.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


def control_id(versioned_report: str) -> str:
    """MSH-10 (ST, at most 20 characters): the same for every retry of one report version."""
    return hashlib.sha256(versioned_report.encode()).hexdigest()[:20].upper()


def _cwe(code: mappings.Code, alternate: mappings.Code | None = None) -> str:
    def triple(c: mappings.Code) -> str:
        system = scheme_designator(c.system)
        return f"{escape(c.code)}^{escape(c.display)}^{system}"

    return triple(code) + (f"^{triple(alternate)}" if alternate is not None and alternate != code else "")


def _ts(value: str | None) -> str:
    """FHIR instant/dateTime -> HL7 TS (YYYYMMDDHHMMSS+ZZZZ)."""
    if not value:
        return ""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return ""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.strftime("%Y%m%d%H%M%S%z")


def _dicom_ts(ds: Dataset) -> str:
    date = str(ds.get("StudyDate") or "")
    time = str(ds.get("StudyTime") or "").split(".")[0]
    return f"{date}{time}" if date else ""


def _pid(msg: Message, ds: Dataset) -> None:
    pid = msg.oru_r01_patient_result.oru_r01_patient.pid
    pid.pid_1 = "1"
    issuer = escape(str(ds.get("IssuerOfPatientID") or ""))
    pid.pid_3 = f"{escape(str(ds.get('PatientID') or ''))}^^^{issuer}^MR" if issuer else escape(str(ds.get("PatientID") or ""))
    name = ds.get("PatientName")
    if name:
        # DICOM PN and HL7 XPN share the family^given^middle^prefix^suffix order
        pid.pid_5 = "^".join(escape(str(p)) for p in str(name).split("=")[0].split("^"))
    if ds.get("PatientBirthDate"):
        pid.pid_7 = str(ds.PatientBirthDate)
    sex = str(ds.get("PatientSex") or "").upper()
    if sex in ("M", "F", "O"):
        pid.pid_8 = sex


def _finding_obx(obx, index: int, f: FindingResult, when: str) -> None:
    primary, local = f.codes[0], f.codes[-1]
    obx.obx_1 = str(index)
    obx.obx_2 = "NM"
    obx.obx_3 = _cwe(primary, local)
    obx.obx_5 = f"{f.probability:.4f}".rstrip("0").rstrip(".") or "0"
    obx.obx_6 = "1^no units^UCUM"
    obx.obx_7 = f"<{f.threshold:g}"
    obx.obx_8 = "A" if f.present else "N"
    obx.obx_11 = "P"
    if when:
        obx.obx_14 = when


def build_oru(rs: ResultSet, *, sending_app: str, sending_facility: str = "", receiving_app: str = "",
              receiving_facility: str = "") -> str:
    """The ORU^R01 as ER7 text (segments separated by CR)."""
    source = rs.sources[0]
    issued = _ts(rs.report.get("issued"))
    msg = Message("ORU_R01", version=VERSION)
    msg.msh.msh_3 = escape(sending_app)
    msg.msh.msh_4 = escape(sending_facility)
    msg.msh.msh_5 = escape(receiving_app)
    msg.msh.msh_6 = escape(receiving_facility)
    msg.msh.msh_7 = issued or datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S%z")
    msg.msh.msh_9 = "ORU^R01^ORU_R01"
    msg.msh.msh_10 = control_id(rs.versioned_ref)
    msg.msh.msh_11 = "P"
    msg.msh.msh_12 = VERSION
    _pid(msg, source)
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    obr = order.obr
    accession = escape(str(source.get("AccessionNumber") or ""))
    obr.obr_1 = "1"
    if accession:
        obr.obr_3 = accession
        obr.obr_18 = accession
    obr.obr_4 = _cwe(rs.procedure_code)
    observed = _dicom_ts(source)
    if observed:
        obr.obr_7 = observed
    obr.obr_19 = rs.study_uid
    if issued:
        obr.obr_22 = issued
    obr.obr_24 = "RAD"
    obr.obr_25 = "P"
    index = 0
    for f in rs.findings:
        index += 1
        _finding_obx(order.add_group("ORU_R01_OBSERVATION").obx, index, f, issued)
    uid = order.add_group("ORU_R01_OBSERVATION").obx
    index += 1
    uid.obx_1, uid.obx_2, uid.obx_3 = str(index), "ST", "110180^Study Instance UID^DCM"
    uid.obx_5, uid.obx_11 = rs.study_uid, "P"
    text = order.add_group("ORU_R01_OBSERVATION").obx
    index += 1
    text.obx_1, text.obx_2, text.obx_3 = str(index), "TX", "19005-8^Radiology Imaging study [Impression] (narrative)^LN"
    statement = " ".join(p for p in (rs.impression, rs.disclaimer) if p)
    text.obx_5, text.obx_11 = escape(statement), "P"
    return msg.to_er7()
