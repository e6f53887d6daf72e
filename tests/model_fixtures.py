"""A tiny, deterministic, hand-wired model and image generators for tests (no weights files, no randomness).

TinyNet is a real conv net -- conv -> ReLU -> spatial mask -> global average pooling -> linear ->
sigmoid -- whose weights are set by hand so its outputs have a known meaning:

    pneumonia     <- brightness of the TOP-LEFT quadrant of the model input
    effusion      <- brightness of the BOTTOM-RIGHT quadrant
    cardiomegaly  <- mean brightness of the whole input   (not critical)

With thresholds 0.6 / 0.6 / 0.9: a black film detects nothing; a film with a white top-left
quadrant detects pneumonia (urgent triage, regions in that quadrant); a uniformly white film detects
all three. Import from here in any test: `from model_fixtures import tiny_model, tiny_analyzer`.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn

from ml.analysis import ModelInfo, OODResult
from ml.image import ImageMetadata, XRayImage
from ml.models.base import LoadedModel, OODGate
from ml.pipeline import Analyzer

TINY_LABELS = ("pneumonia", "effusion", "cardiomegaly")
TINY_DISPLAYS = ("Pneumonia", "Effusion", "Cardiomegaly")
TINY_THRESHOLDS = (0.6, 0.6, 0.9)
TINY_INPUT = 64

DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage


class QuadrantMask(nn.Module):
    """Channel 0 sees only the top-left quadrant, channel 1 only the bottom-right, channel 2 all."""

    def __init__(self, size: int) -> None:
        super().__init__()
        mask = torch.zeros(3, size, size)
        half = size // 2
        mask[0, :half, :half] = 1.0
        mask[1, half:, half:] = 1.0
        mask[2] = 1.0
        self.register_buffer("mask", mask[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


class TinyNet(nn.Module):
    def __init__(self, size: int = TINY_INPUT) -> None:
        super().__init__()
        # 3x3 mean filter mapping [-1024, 1024] to brightness - 0.05 in each of 3 channels; the
        # small offset makes a black film give exactly zero after the ReLU (no rounding noise).
        self.conv = nn.Conv2d(1, 3, kernel_size=3, padding=1, padding_mode="replicate")
        self.relu = nn.ReLU()
        self.mask = QuadrantMask(size)
        self.head = nn.Linear(3, len(TINY_LABELS))
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / (9 * 2048.0))
            self.conv.bias.fill_(0.45)
            # GAP of a quadrant-masked channel is (quadrant brightness - 0.05) / 4.
            self.head.weight.copy_(torch.tensor([[24.0, 0, 0], [0, 24.0, 0], [0, 0, 8.0]]))
            self.head.bias.copy_(torch.tensor([-3.0, -3.0, -4.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.mask(self.relu(self.conv(x)))
        return torch.sigmoid(self.head(feats.mean(dim=(2, 3))))


def tiny_model(*, ood_gate: OODGate | None = None, untrained: bool = False) -> LoadedModel:
    net = TinyNet().eval()
    return LoadedModel(
        info=ModelInfo(name="test:tiny", version="tiny-1", software_version="tests", untrained=untrained),
        labels=TINY_LABELS,
        displays=TINY_DISPLAYS,
        thresholds=TINY_THRESHOLDS,
        input_size=TINY_INPUT,
        network=net,
        cam_layer=net.mask,
        ood_gate=ood_gate,
    )


def tiny_analyzer(
    model: LoadedModel | None = None,
    *,
    ood_gate: OODGate | None = None,
    max_bytes: int = 64 * 1024 * 1024,
    max_pixels: int = 50_000_000,
    heatmap_top_k: int = 3,
) -> Analyzer:
    return Analyzer(
        model or tiny_model(),
        ood_gate=ood_gate,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        heatmap_top_k=heatmap_top_k,
    )


class RefusingGate:
    """An OOD gate that refuses everything, with a reason."""

    reason = "Refused by test gate: not a frontal chest radiograph."

    def check(self, image: XRayImage) -> OODResult:
        return OODResult(passed=False, score=0.1, threshold=0.5, reason=self.reason)


class PassingGate:
    def __init__(self) -> None:
        self.calls = 0

    def check(self, image: XRayImage) -> OODResult:
        self.calls += 1
        return OODResult(passed=True, score=0.9, threshold=0.5)


# ---- images -------------------------------------------------------------------------------------


def quadrant_pixels(width: int, height: int, *, quadrant: str | None = "top_left", base: float = 0.0) -> np.ndarray:
    """float32 [0, 1] (height, width); the given quadrant of the CENTER-CROP square is white.

    quadrant: "top_left", "bottom_right", "all" or None (uniform `base`).
    """
    pixels = np.full((height, width), base, dtype=np.float32)
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    half = side // 2
    if quadrant == "top_left":
        pixels[y0 : y0 + half, x0 : x0 + half] = 1.0
    elif quadrant == "bottom_right":
        pixels[y0 + half : y0 + side, x0 + half : x0 + side] = 1.0
    elif quadrant == "all":
        pixels[:] = 1.0
    return pixels


def xray_image(pixels: np.ndarray, **meta: object) -> XRayImage:
    h, w = pixels.shape
    return XRayImage(pixels=pixels, metadata=ImageMetadata(source_format="png", width=w, height=h, **meta))


def png_bytes(pixels01: np.ndarray, *, bits: int = 8) -> bytes:
    buf = io.BytesIO()
    if bits == 16:
        Image.fromarray((pixels01 * 65535).astype(np.uint16)).save(buf, format="PNG")
    else:
        Image.fromarray((pixels01 * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(
    pixels01: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    sop_class: str = DX_SOP,
    frames: int = 1,
    view: str = "PA",
) -> bytes:
    """A minimal valid single-image DICOM (explicit VR little endian, uncompressed)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    h, w = pixels01.shape
    maxval = (1 << bits_stored) - 1
    values = np.round(pixels01 * maxval).astype(np.uint16)
    if photometric == "MONOCHROME1":
        values = (maxval - values).astype(np.uint16)
    if frames > 1:
        values = np.repeat(values[None], frames, axis=0)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TEST-1"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = values.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
