"""What one stored analysis says, in the shape the DICOM SR/SC and the HL7 ORU builders need.

Read from the FHIR store (the DiagnosticReport, its Observations, heatmap Media and Binaries, the
model Device) plus the analysed source DICOM files: the results are delivered exactly as FHIR
recorded them, never recomputed. Regions and the image a study-level value came from are read
back from the Observation/Media notes written by fhir_server/resources.py (build_observation,
build_heatmap); tests/test_dicom_out.py runs the real $analyze so a change there fails loudly.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pydicom.errors
import pydicom.uid
from pydicom.dataset import Dataset

import mappings
from fhir_server.storage import Repository
from ml.findings import DISCLAIMER

Json = dict[str, Any]

_UID = r"[0-9]+(?:\.[0-9]+)+"
_REGIONS = re.compile(r"Regions \(x1,y1,x2,y2 in original image pixels\): (.+)$")
_MOST_PROBABLE = re.compile(rf"most probable image: .*?image ({_UID})\s*$")
_HEATMAP_ON = re.compile(rf" on .*?image ({_UID}) of ")


LOCAL_SCHEME = "99CXR"  # private coding scheme designator for our cxr-findings codes
_SCHEMES = {
    mappings.SNOMED: "SCT",
    "http://loinc.org": "LN",
    "http://dicom.nema.org/resources/ontology/DCM": "DCM",
}


def scheme_designator(system: str) -> str:
    """FHIR code system URL -> the DICOM / HL7 v2 coding scheme designator (SCT, LN, DCM, 99CXR)."""
    return _SCHEMES.get(system, LOCAL_SCHEME)


class ResultSetError(Exception):
    """The stored analysis or its source files cannot be delivered (not worth retrying)."""


@dataclass(frozen=True)
class FindingResult:
    label: str
    display: str
    codes: tuple[mappings.Code, ...]  # verified external codes first, our local code last
    body_site: mappings.Code | None
    probability: float
    threshold: float
    interpretation: str  # POS | NEG | IND (Observation.interpretation)
    regions: tuple[tuple[int, int, int, int], ...]
    source_uid: str | None  # SOPInstanceUID of the image the value comes from

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class Heatmap:
    label: str
    display: str
    png: bytes
    source_uid: str | None


@dataclass
class ResultSet:
    report: Json
    report_version: str
    findings: list[FindingResult]
    heatmaps: list[Heatmap]
    model_name: str
    model_version: str
    software_version: str
    sources: list[Dataset]  # the analysed images, pixel data included
    paths: list[str] = field(default_factory=list)

    @property
    def report_ref(self) -> str:
        return f"DiagnosticReport/{self.report['id']}"

    @property
    def versioned_ref(self) -> str:
        return f"{self.report_ref}/_history/{self.report_version}"

    @property
    def study_uid(self) -> str:
        return str(self.sources[0].StudyInstanceUID)

    @property
    def conclusion(self) -> str:
        return str(self.report.get("conclusion") or "")

    @property
    def disclaimer(self) -> str:
        return DISCLAIMER

    @property
    def impression(self) -> str:
        """The conclusion without the disclaimer sentence (added back separately where needed)."""
        return self.conclusion.replace(DISCLAIMER, "").strip()

    @property
    def procedure_code(self) -> mappings.Code:
        """The report's LOINC code (36554-4 single view, 36643-5 when a lateral was part of the exam)."""
        for coding in (self.report.get("code") or {}).get("coding") or []:
            if coding.get("system") == "http://loinc.org" and coding.get("code"):
                return mappings.Code(coding["system"], coding["code"], coding.get("display") or coding["code"])
        return mappings.report_code("single_view")

    def source(self, uid: str | None) -> Dataset:
        """The source image a finding refers to; the first one when the record does not say."""
        for ds in self.sources:
            if uid and str(ds.SOPInstanceUID) == uid:
                return ds
        return self.sources[0]


def _regions(notes: list[str]) -> tuple[tuple[int, int, int, int], ...]:
    for text in notes:
        match = _REGIONS.search(text)
        if match:
            boxes = []
            for part in match.group(1).split(";"):
                values = [int(v) for v in part.strip().split(",") if v.strip()]
                if len(values) == 4:
                    boxes.append((values[0], values[1], values[2], values[3]))
            return tuple(boxes)
    return ()


def _first_uid(pattern: re.Pattern[str], notes: list[str]) -> str | None:
    for text in notes:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def _notes(resource: Json) -> list[str]:
    return [n.get("text", "") for n in resource.get("note") or []]


def _label_of(resource: Json) -> str:
    for coding in (resource.get("code") or {}).get("coding") or []:
        if coding.get("system") == mappings.code_system_url():
            return str(coding["code"])
    raise ResultSetError(f"Observation/{resource.get('id')} carries no {mappings.code_system_url()} code")


def finding_of(obs: Json) -> FindingResult:
    label = _label_of(obs)
    mapping = mappings.finding(label, (obs.get("code") or {}).get("text"))
    ranges = obs.get("referenceRange") or [{}]
    interp = ((obs.get("interpretation") or [{}])[0].get("coding") or [{}])[0].get("code", "")
    notes = _notes(obs)
    return FindingResult(
        label=label,
        display=mapping.display,
        codes=(*mapping.verified_codings, mapping.local),
        body_site=mapping.body_site,
        probability=float(obs["valueQuantity"]["value"]),
        threshold=float((ranges[0].get("high") or {}).get("value", 0.5)),
        interpretation=interp,
        regions=_regions(notes),
        source_uid=_first_uid(_MOST_PROBABLE, notes),
    )


# Type 2 attributes of the Patient and General Study modules that our SR/SC copy from the source;
# real images often omit them, and highdicom needs them present (empty is what Type 2 allows).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


_AGE = re.compile(r"^\d{3}[DWMY]$")


def _complete(ds: Dataset) -> Dataset:
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    # an invalid source value would make our own objects invalid too (seen in the wild: "81" for
    # "081Y"); Patient Age is optional, so it is left out rather than guessed
    if "PatientAge" in ds and not _AGE.match(str(ds.PatientAge or "")):
        del ds.PatientAge
    return ds


def _read(path: str) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        # an old ACR-NEMA style file without preamble/file meta: implicit VR little endian
        ds = pydicom.dcmread(path, force=True)
        if "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
            raise
        return ds


def load_sources(paths: list[str]) -> list[Dataset]:
    sources = []
    for path in paths:
        if not Path(path).is_file():
            raise ResultSetError(f"Source DICOM file {path} is missing")
        try:
            sources.append(_complete(_read(path)))
        except Exception as exc:  # pydicom raises many types for a damaged file
            raise ResultSetError(f"Source DICOM file {path} cannot be read: {exc}") from exc
    if not sources:
        raise ResultSetError("No source DICOM instances were given")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in sources}
    if len(studies) != 1 or "" in studies:
        raise ResultSetError(f"Source instances must belong to one study, got {sorted(studies)}")
    return sources


def read_result_set(repo: Repository, report_ref: str, paths: list[str]) -> ResultSet:
    """The report's current version with everything it points to (synchronous: call from a thread)."""
    rtype, _, rid = report_ref.partition("/")
    if rtype != "DiagnosticReport" or not rid:
        raise ResultSetError(f"Not a DiagnosticReport reference: {report_ref!r}")
    with repo.transaction(write=False) as tx:
        stored = tx.read_or_none("DiagnosticReport", rid)
        if stored is None or stored.resource is None:
            raise ResultSetError(f"{report_ref} does not exist")
        report = stored.resource
        findings: list[FindingResult] = []
        for ref in report.get("result") or []:
            otype, _, oid = str(ref.get("reference", "")).partition("/")
            obs = tx.read_or_none(otype, oid) if otype == "Observation" else None
            if obs is not None and obs.resource is not None:
                findings.append(finding_of(obs.resource))
        heatmaps: list[Heatmap] = []
        for link in report.get("media") or []:
            mtype, _, mid = str((link.get("link") or {}).get("reference", "")).partition("/")
            media = tx.read_or_none(mtype, mid) if mtype == "Media" else None
            if media is None or media.resource is None:
                continue
            content = media.resource.get("content") or {}
            btype, _, bid = str(content.get("url", "")).partition("/")
            binary = tx.read_or_none(btype, bid) if btype == "Binary" else None
            if binary is None or not (binary.resource or {}).get("data"):
                continue
            ident = (media.resource.get("identifier") or [{}])[0].get("value", "")
            label = ident.rsplit("#heatmap#", 1)[-1] if "#heatmap#" in ident else ""
            display = mappings.finding(label).display if label else str(content.get("title", "Heatmap"))
            heatmaps.append(Heatmap(
                label, display, base64.b64decode(binary.resource["data"]), _first_uid(_HEATMAP_ON, _notes(media.resource))
            ))
        name = version = software = ""
        device_ref = _device_of(tx, report) or ""
        if device_ref:
            dtype, _, did = device_ref.partition("/")
            device = tx.read_or_none(dtype, did)
            if device is not None and device.resource is not None:
                name = str((device.resource.get("deviceName") or [{}])[0].get("name", ""))
                for v in device.resource.get("version") or []:
                    kind = (v.get("type") or {}).get("text")
                    if kind == "weights":
                        version = str(v.get("value", ""))
                    elif kind == "software":
                        software = str(v.get("value", ""))
        version_id = stored.version
    sources = load_sources(paths)
    return ResultSet(report, version_id, findings, heatmaps, name or "unknown model", version or "unknown",
                     software or "unknown", sources, list(paths))


def _device_of(tx: Any, report: Json) -> str | None:
    """The model Device: every Observation of the report names it (Observation.device)."""
    first = (report.get("result") or [{}])[0].get("reference", "")
    otype, _, oid = str(first).partition("/")
    obs = tx.read_or_none(otype, oid) if otype == "Observation" else None
    return ((obs.resource or {}).get("device") or {}).get("reference") if obs is not None else None
