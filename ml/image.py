"""The decoded image handed from ingest to preprocess."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ImageMetadata:
    """What later stages (FHIR mapping, regions, reports) need to know about the source image."""

    source_format: str  # "dicom" | "png" | "jpeg"
    width: int  # original pixel columns
    height: int  # original pixel rows
    modality: str | None = None  # DICOM Modality (CR, DX, ...) when known
    view_position: str | None = None  # PA / AP / LAT / LL / RL ... when known
    body_part: str | None = None
    photometric: str | None = None  # original PhotometricInterpretation or PIL mode
    pixel_spacing: tuple[float, float] | None = None  # (row, column) mm
    bits_stored: int | None = None
    transfer_syntax: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    patient_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class XRayImage:
    """A single grayscale radiograph ready for preprocessing.

    `pixels` is float32, shape (height, width), display-ready (LUTs applied, MONOCHROME1
    inverted) and scaled to [0, 1] where 1 is brightest (bone). Every ingest path yields this,
    so preprocessing never needs to know where the image came from.
    """

    pixels: np.ndarray
    metadata: ImageMetadata
