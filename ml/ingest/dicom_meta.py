"""DICOM header -> ImageMetadata: the fields later stages (FHIR mapping, regions, reports) need."""

from __future__ import annotations

from pydicom.dataset import Dataset

from ml.image import ImageMetadata

_LATERAL = {"LAT", "LATERAL", "LL", "RL", "LLD", "RLD"}


def build_metadata(ds: Dataset, *, rows: int, cols: int, extra: dict[str, str]) -> ImageMetadata:
    raw_view = _str(ds.get("ViewPosition"))
    view = view_position(ds)
    if raw_view and raw_view.upper() != view:
        extra["view_position_raw"] = raw_view
    ts = None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        ts = str(meta.TransferSyntaxUID)
    if ds.get("NumberOfFrames") is not None:
        extra["number_of_frames"] = str(ds.NumberOfFrames)
    # the patient's age at the study (ml/population.py compares it with a model's validated population)
    for keyword, key in (("PatientAge", "patient_age"), ("PatientBirthDate", "patient_birth_date")):
        if (value := _str(ds.get(keyword))) is not None:
            extra[key] = value
    for keyword in ("StudyDate", "AcquisitionDate", "ContentDate"):
        if (value := _str(ds.get(keyword))) is not None:
            extra["study_date"] = value
            break
    return ImageMetadata(
        source_format="dicom",
        width=cols,
        height=rows,
        modality=_str(ds.get("Modality")),
        view_position=view,
        body_part=_str(ds.get("BodyPartExamined")),
        photometric=_str(ds.get("PhotometricInterpretation")),
        pixel_spacing=pixel_spacing(ds),
        bits_stored=_int(ds.get("BitsStored")),
        transfer_syntax=ts,
        study_instance_uid=_str(ds.get("StudyInstanceUID")),
        series_instance_uid=_str(ds.get("SeriesInstanceUID")),
        sop_instance_uid=_str(ds.get("SOPInstanceUID")),
        sop_class_uid=_str(ds.get("SOPClassUID")),
        patient_id=_str(ds.get("PatientID")),
        extra=extra,
    )


def view_position(ds: Dataset) -> str | None:
    """PA / AP / LAT from ViewPosition, else ViewCodeSequence, else a PatientOrientation hint."""
    raw = (_str(ds.get("ViewPosition")) or "").upper()
    if raw in ("PA", "AP"):
        return raw
    if raw in _LATERAL:
        return "LAT"
    for item in ds.get("ViewCodeSequence") or []:
        meaning = (_str(item.get("CodeMeaning")) or "").lower().replace("-", "").replace(" ", "")
        code = _str(item.get("CodeValue")) or ""
        # DICOM CID 4010 (DX View): SNOMED CT and the older SNOMED-RT codes. Obliques are not
        # mapped (neither frontal nor lateral for the model's purposes).
        if "oblique" in meaning:
            continue
        if meaning.startswith("posteroanterior") or code in ("272479007", "R-10214"):
            return "PA"
        if meaning.startswith("anteroposterior") or code in ("399348003", "R-10206"):
            return "AP"
        if "lateral" in meaning or code in ("399067008", "399198007", "399173006", "R-102CD", "R-10232", "R-10236"):
            return "LAT"
    # PatientOrientation (row direction, column direction): a lateral film runs anterior/posterior
    # along its rows; a frontal one runs left/right and cannot tell PA from AP.
    orient = ds.get("PatientOrientation")
    if orient and not isinstance(orient, str) and len(orient) >= 1:
        first = (_str(orient[0]) or "").upper()
        if first[:1] in ("A", "P"):
            return "LAT"
    if raw:
        return raw  # something else the sender wrote (e.g. "OBL"); keep it rather than guess
    return None


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) >= 2:
                row, col = float(value[0]), float(value[1])
                if row > 0 and col > 0:
                    return (row, col)
        except (TypeError, ValueError):
            continue
    return None


def _str(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
