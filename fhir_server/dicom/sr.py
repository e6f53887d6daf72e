"""The analysis as a DICOM Comprehensive 3D SR: TID 1500 Measurement Report per IHE AI Results.

Built with highdicom (it writes the TID 1500/1410/1501/4019 content trees and the SR document
modules correctly; hand-building them with pydicom is how SRs end up invalid). Layout:

    Imaging Measurement Report (TID 1500), PRELIMINARY, UNVERIFIED, PARTIAL
      Language, Observer = the AI model as a Device, Procedure reported = LOINC 36554-4
      Image Library: every analysed source instance
      Imaging Measurements
        per finding (TID 1501): tracking id, finding type = finding code, Algorithm
          Identification (name, version = model version, parameters = operating points),
          Probability (DCM 122157, unit 1), qualitative evaluation finding = Present | Absent
          (against the finding's operating point), source image
        per region of a finding (TID 1410): the region as SCOORD POLYLINE on the source image,
          the same finding type, probability and evaluation
      Comment (TEXT): the impression and the "preliminary, not a diagnosis" statement
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import mappings

from .result_set import FindingResult, ResultSet, scheme_designator

MANUFACTURER = "CXR-FHIR"
PROBABILITY = codes.DCM.Probability
UNIT_ONE = CodedConcept("1", "UCUM", "no units")
SR_SERIES_NUMBER = 9001
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "http://cxr-fhir.org/dicom/uid")
SR_DESCRIPTION = "AI RESULT - PRELIMINARY, NOT A DIAGNOSIS"


def uid_for(*parts: str) -> str:
    """A deterministic 2.25 UID: re-delivering the same report version reuses the same UIDs, so a
    PACS that receives it twice stores one object, and a new version becomes a new instance."""
    # pydicom's generate_uid ignores entropy_srcs under the 2.25 root, so derive the UUID ourselves
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(parts)).int}"


def coded(code: mappings.Code) -> CodedConcept:
    return CodedConcept(code.code, scheme_designator(code.system), code.display[:64])


def finding_code(finding: FindingResult) -> CodedConcept:
    """SNOMED CT where the mapping is verified, else our own code (same rule as Observation.code)."""
    return coded(finding.codes[0])


def algorithm(rs: ResultSet) -> AlgorithmIdentification:
    params = [f"operating_point.{f.label}={f.threshold:g}" for f in rs.findings]
    params.append(f"software_version={rs.software_version}")
    return AlgorithmIdentification(name=rs.model_name[:64], version=rs.model_version[:64], parameters=params)


def _present(finding: FindingResult) -> CodedConcept:
    return codes.SCT.Present if finding.present else codes.SCT.Absent


def _rectangle(box: Sequence[int], ds: Dataset) -> np.ndarray:
    cols, rows = int(ds.Columns), int(ds.Rows)
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = max(0.0, min(x1, cols)), max(0.0, min(x2, cols))
    y1, y2 = max(0.0, min(y1, rows)), max(0.0, min(y2, rows))
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float32)


def _groups(rs: ResultSet, algo: AlgorithmIdentification) -> list:
    groups: list = []
    for f in rs.findings:
        code = finding_code(f)
        source = rs.source(f.source_uid)
        sites = [FindingSite(coded(f.body_site))] if f.body_site else None
        evaluation = [QualitativeEvaluation(code, _present(f))]

        def probability() -> list[Measurement]:
            return [Measurement(name=PROBABILITY, value=round(f.probability, 4), unit=UNIT_ONE)]

        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=uid_for(rs.report_ref, f.label), identifier=f.label),
            finding_type=code,
            algorithm_id=algo,
            finding_sites=sites,
            measurements=probability(),
            qualitative_evaluations=evaluation,
            source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
        ))
        for i, box in enumerate(f.regions, 1):
            groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=uid_for(rs.report_ref, f.label, "region", str(i)), identifier=f"{f.label} region {i}"
                ),
                referenced_region=ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=_rectangle(box, source),
                    source_image=SourceImageForRegion.from_source_image(source),
                ),
                finding_type=code,
                algorithm_id=algo,
                finding_sites=sites,
                measurements=probability(),
                qualitative_evaluations=evaluation,
            ))
    return groups


def _library_entry(ds: Dataset) -> Dataset:
    """The header highdicom describes in the Image Library. Its projection-radiography
    descriptors (TID 1603) need PatientOrientation and ImagerPixelSpacing, which many CR/DX
    images lack; those are optional in the template, so such images are listed without them."""
    header = Dataset()
    header.update({e.tag: e for e in ds if e.tag < 0x7FE00000})
    if "PatientOrientation" not in ds or "ImagerPixelSpacing" not in ds or len(ds.PatientOrientation) != 2:
        header.Modality = "OT"
    return header


def build_sr(rs: ResultSet) -> Dataset:
    """The SR document for this report version (deterministic UIDs, new series in the same study)."""
    algo = algorithm(rs)
    observer = ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=uid_for("device", rs.model_name, rs.model_version),
                name=rs.model_name[:64],
                manufacturer_name=MANUFACTURER,
                model_name=rs.model_name[:64],
            ),
        )
    )
    report = MeasurementReport(
        observation_context=observer,
        procedure_reported=coded(rs.procedure_code),
        imaging_measurements=_groups(rs, algo),
        referenced_images=[_library_entry(ds) for ds in rs.sources],
    )
    statement = " ".join(p for p in (rs.impression, rs.disclaimer) if p)
    report[0].ContentSequence.append(
        TextContentItem(name=codes.DCM.Comment, value=statement[:10240], relationship_type="CONTAINS")
    )
    first = rs.sources[0]
    sr = Comprehensive3DSR(
        evidence=rs.sources,
        content=report[0],
        series_instance_uid=uid_for(rs.report_ref, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid_for(rs.versioned_ref, "sr"),
        instance_number=int(rs.report_version),
        manufacturer=MANUFACTURER,
        is_complete=False,
        is_final=False,
        is_verified=False,
        series_description=SR_DESCRIPTION,
        manufacturer_model_name=rs.model_name[:64],
        software_versions=rs.software_version[:64],
        device_serial_number=rs.model_version[:64],
    )
    # Accession number and referring physician come from the study so the RIS can match it.
    for keyword in ("AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDate", "StudyTime"):
        if keyword in first:
            setattr(sr, keyword, first.data_element(keyword).value)
    return sr
