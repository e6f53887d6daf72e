"""TorchXRayVision models, loaded through torchxrayvision's own classes from a local weights directory.

Weights are never downloaded at run time (a hospital server is offline, and torchxrayvision's
downloader would hang or leave a 0-byte file behind). We compute the file name exactly as
`torchxrayvision.models.get_weights` does (basename of the release URL), check that it exists in
`weights_dir` *before* constructing the model, and otherwise raise ModelUnavailable naming the file,
the directory and the URL to fetch it from. Only then is `xrv.models.DenseNet(weights=..., cache_dir=
weights_dir)` called, which finds the file and does not touch the network.

File formats (from torchxrayvision 1.x models.py): DenseNet weights are a whole pickled model
(`torch.load(..., weights_only=False)` then `.state_dict()`); ResNet weights are a state dict of the
torchvision ResNet inside. Both use pickle, so the weights directory must be trusted: it is an
operator-controlled path, never user input.

Outputs and thresholds: torchxrayvision applies `op_norm` with each model's calibrated operating
points (`op_threshs`) after the sigmoid. op_norm maps [0, t] linearly onto [0, 0.5] and [t, 1] onto
[0.5, 1], so the operating point of every output sits at exactly 0.5: our threshold is 0.5 for every
label. Outputs whose operating point is NaN are a constant 0.5 (op_norm leaves them at its initial
value), so they are dropped: the empty "" placeholder outputs of the partial-label models, and Lung
Lesion / Enlarged Cardiomediastinum of resnet50-res512-all.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from torch import nn

from ml.analysis import ModelInfo
from ml.errors import ModelUnavailable
from ml.models.base import LoadedModel
from ml.models.registry import software_version

# registry name -> torchxrayvision weights key
XRV_MODELS: dict[str, str] = {
    "xrv:densenet121-res224-all": "densenet121-res224-all",
    "xrv:densenet121-res224-nih": "densenet121-res224-nih",
    "xrv:densenet121-res224-pc": "densenet121-res224-pc",
    "xrv:densenet121-res224-chex": "densenet121-res224-chex",
    "xrv:densenet121-res224-rsna": "densenet121-res224-rsna",
    "xrv:densenet121-res224-mimic_nb": "densenet121-res224-mimic_nb",
    "xrv:densenet121-res224-mimic_ch": "densenet121-res224-mimic_ch",
    "xrv:resnet50-res512-all": "resnet50-res512-all",
}

MODEL_CARD_URL = "https://github.com/mlmed/torchxrayvision"
THRESHOLD = 0.5  # op_norm puts every calibrated operating point at 0.5 (see module docstring)


def snake_label(xrv_name: str) -> str:
    """'Lung Opacity' -> 'lung_opacity', 'Pleural_Thickening' -> 'pleural_thickening'."""
    return "_".join(xrv_name.replace("_", " ").lower().split())


def display_label(xrv_name: str) -> str:
    return " ".join(xrv_name.replace("_", " ").split())


def _xrv():
    import torchxrayvision as xrv  # heavy import: only when an xrv model is requested

    return xrv


def weights_file(name: str) -> tuple[str, str]:
    """(file name torchxrayvision expects, URL it is published at) for a registry name."""
    key = XRV_MODELS[name]
    url = _xrv().models.model_urls[key]["weights_url"]
    return os.path.basename(url), url  # exactly how xrv.models.get_weights names the local file


def _require_weights(name: str, weights_dir: Path) -> Path:
    filename, url = weights_file(name)
    path = Path(weights_dir).expanduser() / filename
    if not path.is_file():
        raise ModelUnavailable(
            f"Weights for model {name!r} not found: expected file {filename!r} in directory "
            f"{str(path.parent)!r}. Download it from {url} and put it there (or set CXR_WEIGHTS_DIR); "
            "weights are never downloaded at run time."
        )
    if path.stat().st_size == 0:
        raise ModelUnavailable(
            f"Weights file {str(path)!r} for model {name!r} is empty (an interrupted download?). "
            f"Replace it with the file from {url}."
        )
    return path


def _sha256_prefix(path: Path, n: int = 12) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:n]


class _SelectOutputs(nn.Module):
    """The xrv model with only the meaningful outputs kept, in a fixed order, op_norm'd.

    torchxrayvision's `op_norm` writes through boolean masks (`out[mask] = ...`): the ONNX tracer
    bakes the number of True entries of the example batch into the graph, so an exported model
    fails or is wrong on any batch whose outputs fall on other sides of the operating points. The
    xrv model is therefore asked for plain sigmoid outputs (its own `apply_sigmoid` branch) and the
    same piecewise-linear map is applied here with `torch.where`, which traces to one graph for
    every batch. tests/test_engine.py checks it against `xrv.models.op_norm` and on batches that straddle them.
    """

    def __init__(self, model: nn.Module, keep: list[int]) -> None:
        super().__init__()
        op_threshs = getattr(model, "op_threshs", None)
        self.model = model
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.long), persistent=False)
        if op_threshs is not None:
            self.register_buffer("op_threshs", op_threshs.detach().clone().float().index_select(0, self.keep))
            model.op_threshs = None
            model.apply_sigmoid = True
        else:
            self.op_threshs = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x).index_select(1, self.keep)
        return out if self.op_threshs is None else op_norm(out, self.op_threshs)


def op_norm(probs: torch.Tensor, op_threshs: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's op_norm for non-NaN operating points: [0, t] -> [0, 0.5], [t, 1] -> [0.5, 1]."""
    t = op_threshs.unsqueeze(0)
    return torch.where(probs < t, probs / (t * 2), 1.0 - (1.0 - probs) / ((1.0 - t) * 2))


def load_xrv(name: str, *, weights_dir: Path) -> LoadedModel:
    if name not in XRV_MODELS:
        raise ModelUnavailable(f"Unknown TorchXRayVision model {name!r}; known: {sorted(XRV_MODELS)}")
    path = _require_weights(name, weights_dir)  # before any xrv code can try to download
    xrv = _xrv()
    key = XRV_MODELS[name]
    try:
        if key.startswith("resnet"):
            model = xrv.models.ResNet(weights=key, cache_dir=str(path.parent))
            cam_layer = model.model.layer4
        else:
            model = xrv.models.DenseNet(weights=key, cache_dir=str(path.parent))
            # norm5 is the last op of the last dense block's output; its (ReLU'd) activations are
            # what the global pooling and classifier see, so it is the Grad-CAM layer.
            cam_layer = model.features.norm5
    except Exception as exc:  # corrupt/foreign pickle, wrong architecture: say which file
        raise ModelUnavailable(
            f"Could not load weights file {str(path)!r} for model {name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    model.eval()
    # Our preprocessing guarantees the [-1024, 1024] range; skip xrv's one-time stdout range warning.
    xrv.utils.warning_log["norm_check"] = True

    spec = xrv.models.model_urls[key]
    op_threshs = spec.get("op_threshs") or [math.nan] * len(spec["labels"])
    keep = [
        i
        for i, (label, t) in enumerate(zip(spec["labels"], op_threshs, strict=True))
        if label and t is not None and not math.isnan(t)
    ]
    labels = tuple(snake_label(spec["labels"][i]) for i in keep)
    displays = tuple(display_label(spec["labels"][i]) for i in keep)
    info = ModelInfo(
        name=name,
        version=f"{key}-sha256:{_sha256_prefix(path)}",
        software_version=f"{software_version()}; torchxrayvision {xrv.__version__}",
        model_card_url=MODEL_CARD_URL,
    )
    return LoadedModel(
        info=info,
        labels=labels,
        displays=displays,
        thresholds=tuple(THRESHOLD for _ in labels),
        input_size=int(spec.get("input_resolution", 224)),
        network=_SelectOutputs(model, keep).eval(),
        cam_layer=cam_layer,
    )
