"""A loudly labelled UNTRAINED placeholder model.

It exists only so the server, the API and the FHIR mapping can run end to end before (or without)
real weights. Its weights are random (fixed seed, so runs are repeatable); its outputs mean nothing.
`ModelInfo.untrained=True` makes every report and API response say so.
"""

from __future__ import annotations

import torch
from torch import nn

from ml.analysis import ModelInfo
from ml.models.base import LoadedModel
from ml.models.registry import software_version

NAME = "cxr:untrained-demo"
SEED = 0
INPUT_SIZE = 224
LABELS = ("pneumonia", "effusion", "pneumothorax", "edema", "cardiomegaly", "lung_opacity")
DISPLAYS = ("Pneumonia", "Effusion", "Pneumothorax", "Edema", "Cardiomegaly", "Lung Opacity")


class SmallCNN(nn.Module):
    """Conv stack -> global average pooling -> linear head -> sigmoid. Input (N, 1, S, S) in [-1024, 1024]."""

    def __init__(self, n_labels: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for i in range(4):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, n_labels)

    @property
    def cam_layer(self) -> nn.Module:
        return self.features[-1]  # the last ReLU: its activations feed the global pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / 1024.0
        feats = self.features(x)
        pooled = feats.mean(dim=(2, 3))
        return torch.sigmoid(self.head(pooled))


def load_untrained(name: str = NAME) -> LoadedModel:
    with torch.random.fork_rng(devices=[]):  # repeatable random weights; caller's RNG untouched
        torch.manual_seed(SEED)
        net = SmallCNN(len(LABELS)).eval()
    info = ModelInfo(
        name=name, version=f"untrained-seed{SEED}", software_version=software_version(), untrained=True
    )
    return LoadedModel(
        info=info,
        labels=LABELS,
        displays=DISPLAYS,
        thresholds=tuple(0.5 for _ in LABELS),
        input_size=INPUT_SIZE,
        network=net,
        cam_layer=net.cam_layer,
    )
