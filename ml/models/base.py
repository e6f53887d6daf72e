"""The one interface every served model satisfies, whatever its origin (ours or TorchXRayVision)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ml.analysis import ModelInfo, OODResult
from ml.image import XRayImage


class OODGate(Protocol):
    """Decides whether an image is a frontal chest radiograph before any finding is reported."""

    def check(self, image: XRayImage) -> OODResult: ...


@dataclass
class LoadedModel:
    info: ModelInfo
    labels: tuple[str, ...]  # snake_case finding names in output order, e.g. ("pneumonia",)
    displays: tuple[str, ...]  # human names in the same order, e.g. ("Pneumonia",)
    thresholds: tuple[float, ...]  # operating threshold per label (on `network`'s probabilities)
    input_size: int  # square side the network expects (preprocess resizes to it)
    # eval mode; input (N, 1, S, S) float32 in TorchXRayVision's [-1024, 1024] range;
    # output (N, len(labels)) calibrated probabilities in [0, 1].
    network: torch.nn.Module
    # the conv layer whose activations feed the global pooling: the Grad-CAM target.
    cam_layer: torch.nn.Module
    # a model-specific gate; when None the pipeline uses the bundled default gate.
    ood_gate: OODGate | None = None
    # the population the model was validated on (ml.population.PEDIATRIC / ADULT); None: not checked
    validated_population: str | None = None
    # an ensemble's members (ml/models/ensemble.py); empty for a single model
    members: tuple[LoadedModel, ...] = ()
