"""Which DICOM objects we accept: single-frame projection radiographs (CR, DX, secondary capture)."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

from ml.errors import UnsupportedDicom

ACCEPTED_DICOM = "Accepted: a single-frame CR, DX or secondary-capture chest radiograph."

ACCEPTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    # Multi-frame secondary capture classes are fine when they hold exactly one frame
    # (some PACS export screenshots of radiographs this way).
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
}

# Modalities that are never a projection chest radiograph, with a word a user understands.
REFUSED_MODALITIES = {
    "CT": "a CT image",
    "MR": "an MR image",
    "PT": "a PET image",
    "NM": "a nuclear medicine image",
    "US": "an ultrasound image",
    "MG": "a mammogram",
    "XA": "an X-ray angiography image",
    "RF": "a fluoroscopy image",
    "IO": "an intra-oral dental X-ray",
    "PX": "a panoramic dental X-ray",
    "OP": "an ophthalmic photograph",
    "OPT": "an ophthalmic tomography image",
    "SM": "a slide microscopy image",
    "ES": "an endoscopy image",
    "XC": "an external camera photograph",
    "ECG": "an ECG waveform",
    "SR": "a structured report",
    "PR": "a presentation state",
    "KO": "a key object selection",
    "DOC": "a document",
    "RTIMAGE": "a radiotherapy image",
    "RTSTRUCT": "a radiotherapy structure set",
    "RTPLAN": "a radiotherapy plan",
    "RTDOSE": "a radiotherapy dose",
    "SEG": "a segmentation",
    "REG": "a registration",
}

_NO_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def sop_class_name(ds: Dataset) -> str | None:
    uid = ds.get("SOPClassUID")
    if not uid:
        return None
    name = UID(str(uid)).name
    return name if name and name != str(uid) else None


def check_supported(ds: Dataset) -> None:
    """Raise UnsupportedDicom, with what the object is and what we accept, unless usable."""
    modality = str(ds.get("Modality", "") or "").upper()
    sop_uid = str(ds.get("SOPClassUID", "") or "")
    sop_name = sop_class_name(ds)
    what = sop_name or (REFUSED_MODALITIES.get(modality)) or (f"modality {modality}" if modality else None)
    what_txt = f" ({what})" if what else ""

    if not any(tag in ds for tag in _NO_PIXEL_TAGS):
        raise UnsupportedDicom(
            f"This DICOM object has no image pixel data{what_txt}: it is not an image "
            f"(e.g. a structured report or presentation state). {ACCEPTED_DICOM}"
        )
    if modality in REFUSED_MODALITIES:
        raise UnsupportedDicom(
            f"This DICOM is {REFUSED_MODALITIES[modality]} (Modality {modality}"
            f"{', ' + sop_name if sop_name else ''}), not a projection radiograph. {ACCEPTED_DICOM}"
        )
    # A registered SOP class outside the accepted set (CT/MR Image Storage, enhanced classes, ...)
    # is refused even if Modality is missing or wrong; private classes fall through to the
    # modality check above.
    if sop_uid and sop_name and sop_uid not in ACCEPTED_SOP_CLASSES:
        raise UnsupportedDicom(
            f"DICOM SOP class '{sop_name}' is not a projection radiograph. {ACCEPTED_DICOM}"
        )
    frames = _int(ds.get("NumberOfFrames"), default=1)
    if frames > 1:
        raise UnsupportedDicom(
            f"This DICOM has {frames} frames{what_txt}; only single-frame images can be "
            f"analysed. Send one frame as its own instance. {ACCEPTED_DICOM}"
        )
    samples = _int(ds.get("SamplesPerPixel"), default=1)
    if samples not in (1, 3):
        raise UnsupportedDicom(f"DICOM SamplesPerPixel={samples} is not supported. {ACCEPTED_DICOM}")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedDicom(f"DICOM float pixel data (parametric maps) is not supported. {ACCEPTED_DICOM}")


def _int(value: object, *, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default
