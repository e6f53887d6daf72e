"""The result of analysing one image: plain data, the only thing fhir_server consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from ml.image import ImageMetadata
from ml.population import PopulationResult

SEVERITIES = ("none", "low", "moderate", "high")


@dataclass(frozen=True)
class Finding:
    label: str  # snake_case finding name, e.g. "pneumonia", "lung_opacity"
    display: str  # human name, e.g. "Pneumonia", "Lung Opacity"
    probability: float  # calibrated probability 0..1
    threshold: float  # the model's operating threshold for this finding
    detected: bool  # probability >= threshold
    severity: str  # one of SEVERITIES (see ml/findings.py for the definition)
    critical: bool  # finding belongs to the critical set (urgent triage when detected)
    regions: list[list[int]] = field(default_factory=list)  # [x1, y1, x2, y2] in original pixels
    heatmap_png: bytes | None = None  # PNG overlay, only when heatmaps were requested


@dataclass(frozen=True)
class ModelInfo:
    name: str  # registry name, e.g. "cxr:pneumonia-v1" or "xrv:densenet121-res224-all"
    version: str  # weights identity (e.g. sha256 prefix) - changes whenever the weights change
    software_version: str
    untrained: bool = False  # True only for the loud placeholder model
    model_card_url: str | None = None
    # sha256 of the weights file as released (TorchXRayVision: the release pickle, from the installed
    # manifest; bundled: its safetensors); published in the FHIR Device and every Provenance.
    weights_sha256: str | None = None
    # an ensemble's members, in order (empty for a single model)
    members: tuple[ModelInfo, ...] = ()


@dataclass(frozen=True)
class OODResult:
    passed: bool
    score: float  # higher = more like a frontal chest radiograph, 0..1
    threshold: float
    reason: str | None = None
    # which check decided: "metadata" | "chest_vs_not" | "orientation" | "distance" (None when it passed)
    check: str | None = None
    # the film's population (ml/population.py), when the gate could tell
    population: PopulationResult | None = None
    # True when the orientation check compared the film with its turned / inverted copies (four
    # extra backbone passes; ml/ood.py): counted in /metrics so a site sees what the gate costs
    compared_copies: bool = False


@dataclass(frozen=True)
class Analysis:
    findings: list[Finding]  # ranked: severity then probability, highest first
    triage: str  # "urgent" | "routine"
    confidence_score: float  # 0..1, see ml/findings.py for the definition
    impression: str  # one-line summary
    report_text: str  # short human-readable report, always ends with the disclaimer
    model: ModelInfo
    image: ImageMetadata
    ood: OODResult | None
    created: datetime  # timezone-aware UTC
    processing_time_ms: float
    # Flags a person must see with the result (gate in warn mode, outside the validated population)
    warnings: tuple[str, ...] = ()
    # True when the film is outside the population the model was validated on: never triaged
    # urgent, and its findings carry no positive/negative interpretation
    outside_population: bool = False
