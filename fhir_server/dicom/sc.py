"""Heatmap overlays as DICOM Secondary Capture images (highdicom SCImage), for every PACS viewer.

One SC per heatmap the analysis stored (a heatmap belongs to one finding on one analysed image),
all in one new series of the study. The picture is the stored heatmap PNG (the Grad-CAM colour
map already blended over the grayscale film) with black bands above and below carrying the
burned-in warning "AI OUTPUT - PRELIMINARY, NOT FOR DIAGNOSIS" and the finding, probability,
operating point and model; BurnedInAnnotation is YES and the series/derivation descriptions say
the same, so no viewer can show it as an acquired image.
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from .result_set import FindingResult, Heatmap, ResultSet
from .sr import MANUFACTURER, uid_for

WARNING = "AI OUTPUT - PRELIMINARY, NOT FOR DIAGNOSIS"
SC_SERIES_NUMBER = 9002
SC_DESCRIPTION = "AI HEATMAP - PRELIMINARY, NOT FOR DIAGNOSIS"
MIN_WIDTH = 512  # narrow films are enlarged so the warning stays legible
_DERIVATION = (
    "Grad-CAM heatmap of an AI model over the source radiograph; burned-in AI output label. "
    "Preliminary decision support, not a diagnosis."
)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fitted(draw: ImageDraw.ImageDraw, text: str, width: int, start: int) -> tuple[object, int]:
    size = start
    while size > 8:
        font = _font(size)
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        if right - left <= width:
            return font, size
        size -= 1
    return _font(8), 8


def _banded(png: bytes, top: str, bottom: str) -> np.ndarray:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if img.width < MIN_WIDTH:
        scale = MIN_WIDTH / img.width
        img = img.resize((MIN_WIDTH, max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
    band = max(28, img.width // 16)
    canvas = Image.new("RGB", (img.width, img.height + 2 * band), (0, 0, 0))
    canvas.paste(img, (0, band))
    draw = ImageDraw.Draw(canvas)
    margin = band // 4
    for text, y0, colour in ((top, 0, (255, 255, 0)), (bottom, band + img.height, (255, 255, 255))):
        font, size = _fitted(draw, text, img.width - 2 * margin, int(band * 0.6))
        draw.text((margin, y0 + (band - size) // 2), text, fill=colour, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _caption(rs: ResultSet, heatmap: Heatmap, finding: FindingResult | None) -> str:
    text = f"{heatmap.display}"
    if finding is not None:
        text += f" p={finding.probability:.2f} (operating point {finding.threshold:.2f})"
    return f"{text} - {rs.model_name} {rs.model_version}"


def build_sc(rs: ResultSet, heatmap: Heatmap, index: int) -> Dataset:
    source = rs.source(heatmap.source_uid)
    finding = next((f for f in rs.findings if f.label == heatmap.label), None)
    pixels = _banded(heatmap.png, WARNING, _caption(rs, heatmap, finding))
    orientation = list(source.get("PatientOrientation") or [])
    known = len(orientation) == 2
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uid_for(rs.report_ref, "sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uid_for(rs.versioned_ref, "sc", heatmap.label, str(source.SOPInstanceUID)),
        instance_number=index,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        # highdicom insists on an orientation; PatientOrientation is Type 2 in DICOM, so when the
        # source does not record one it is sent empty rather than guessed
        patient_orientation=tuple(orientation) if known else ("L", "F"),
    )
    if not known:
        sc.PatientOrientation = None
    sc.BurnedInAnnotation = "YES"
    if "Laterality" not in sc:  # Type 2C; a chest is unpaired, so present and empty
        sc.Laterality = source.get("Laterality") or None
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.SeriesDescription = SC_DESCRIPTION
    sc.DerivationDescription = _DERIVATION
    sc.ImageComments = f"{WARNING}. {_caption(rs, heatmap, finding)}"[:10240]
    sc.ManufacturerModelName = rs.model_name[:64]
    sc.SoftwareVersions = rs.software_version[:64]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = DicomSequence([ref])
    return sc


def build_scs(rs: ResultSet) -> list[Dataset]:
    return [build_sc(rs, h, i) for i, h in enumerate(rs.heatmaps, 1)]
