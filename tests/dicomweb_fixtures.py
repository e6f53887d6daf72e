"""DICOMweb payloads generated in code: DICOM Part 10 files (pydicom), QIDO-RS DICOM JSON and
WADO-RS multipart/related bodies, in the formats a real PACS (dcm4chee, Orthanc) answers with."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pydicom
from model_fixtures import dicom_bytes, quadrant_pixels

PACS = "https://pacs.example.test/dicom-web"
BOUNDARY = "DICOMwebBoundary-7d9a1c"


@dataclass(frozen=True)
class Instance:
    series_uid: str
    sop_uid: str
    modality: str
    view: str
    data: bytes


def make_instance(study_uid: str, series_uid: str, sop_uid: str, *, view: str = "PA", modality: str = "DX",
                  quadrant: str = "top_left") -> Instance:
    raw = dicom_bytes(quadrant_pixels(96, 96, quadrant=quadrant), view=view, modality=modality)
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return Instance(series_uid, sop_uid, modality, view, buf.getvalue())


def qido_json(study_uid: str, instances: list[Instance], *, with_view: bool = True) -> list[dict]:
    """QIDO-RS /studies/{uid}/instances answer (DICOM JSON model, PS3.18 F.2)."""
    out = []
    for inst in instances:
        item = {
            "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.1.1"]},
            "00080018": {"vr": "UI", "Value": [inst.sop_uid]},
            "00080060": {"vr": "CS", "Value": [inst.modality]},
            "0020000D": {"vr": "UI", "Value": [study_uid]},
            "0020000E": {"vr": "UI", "Value": [inst.series_uid]},
            "00200013": {"vr": "IS", "Value": [1]},
            "00081190": {"vr": "UR", "Value": [f"{PACS}/studies/{study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"]},
        }
        if with_view:
            item["00185101"] = {"vr": "CS", "Value": [inst.view]}
        out.append(item)
    return out


def multipart(*payloads: bytes, boundary: str = BOUNDARY, preamble: bytes = b"") -> tuple[bytes, str]:
    """(body, Content-Type) of a WADO-RS multipart/related response."""
    body = preamble
    for payload in payloads:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        body += payload + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary="{boundary}"'


def mock_study(study_uid: str, instances: list[Instance], *, with_view: bool = True) -> None:
    """Inside `with respx.mock:`, the PACS answers QIDO-RS for the study and WADO-RS for each instance."""
    import httpx
    import respx

    respx.get(f"{PACS}/studies/{study_uid}/instances").mock(return_value=httpx.Response(
        200, json=qido_json(study_uid, instances, with_view=with_view), headers={"content-type": "application/dicom+json"}))
    for inst in instances:
        mock_instance(study_uid, inst)


def mock_instance(study_uid: str, inst: Instance) -> None:
    """Inside `with respx.mock:`, the PACS answers WADO-RS for one instance (multipart/related)."""
    import httpx
    import respx

    body, ctype = multipart(inst.data)
    respx.get(f"{PACS}/studies/{study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}").mock(
        return_value=httpx.Response(200, content=body, headers={"content-type": ctype}))


def endpoint(endpoint_id: str = "pacs") -> dict:
    return {
        "resourceType": "Endpoint",
        "id": endpoint_id,
        "status": "active",
        "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"},
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": PACS,
    }


def imaging_study(study_uid: str, endpoint_ref: str = "Endpoint/pacs", subject: str = "Patient/p1") -> dict:
    return {
        "resourceType": "ImagingStudy",
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        "subject": {"reference": subject},
        "started": "2024-05-01T09:30:00Z",
        "endpoint": [{"reference": endpoint_ref}],
    }
