"""TorchXRayVision models, loaded through torchxrayvision's own classes from a local weights directory.

Weights are never downloaded at run time and no pickle is read here: `cxr models pull` / `import`
(ml/weights/) check the release file's size and sha256 against the catalog, read it once with
torch.load(weights_only=True) and install safetensors + a manifest in the weights directory. This
module loads those safetensors (after checking their sha256 against the manifest) into
torchxrayvision's own model classes, or raises ModelUnavailable naming the command to run.
The release file's sha256 becomes ModelInfo.weights_sha256 (FHIR Device version, Provenance).

Outputs and thresholds: torchxrayvision applies `op_norm` with each model's calibrated operating
points (`op_threshs`) after the sigmoid. op_norm maps [0, t] linearly onto [0, 0.5] and [t, 1] onto
[0.5, 1], so the operating point of every output sits at exactly 0.5: our threshold is 0.5 for every
label. Outputs whose operating point is NaN are a constant 0.5 (op_norm leaves them at its initial
value), so they are dropped: the empty "" placeholder outputs of the partial-label models, and Lung
Lesion / Enlarged Cardiomediastinum of resnet50-res512-all.
"""

from __future__ import annotations

from ml.population import ADULT

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
    """(release file name, URL it is published at) for a registry name."""
    key = XRV_MODELS[name]
    url = _xrv().models.model_urls[key]["weights_url"]
    return os.path.basename(url), url


def _load_installed(name: str, weights_dir: Path):
    """(network, manifest) from the installed safetensors; ModelUnavailable with the command to run."""
    from ml.weights.catalog import load_catalog
    from ml.weights.store import WeightsRejected, load_installed

    entry = load_catalog().get(name)
    folder = Path(weights_dir).expanduser()
    try:
        return load_installed(entry, folder)
    except FileNotFoundError:
        legacy = folder / entry.file
        hint = (
            f" A release pickle {entry.file!r} is there: convert it once with `cxr models import {legacy}`."
            if legacy.is_file() else ""
        )
        raise ModelUnavailable(
            f"Weights for model {name!r} are not installed in {str(folder)!r}. Run `cxr models pull {entry.name}` "
            f"(offline: `cxr models import FILE|BUNDLE`), or set CXR_WEIGHTS_DIR; weights are never downloaded "
            f"at run time.{hint}"
        ) from None
    except (WeightsRejected, OSError, ValueError) as exc:
        raise ModelUnavailable(
            f"Installed weights for model {name!r} in {str(folder)!r} failed their check: {exc}. "
            f"Run `cxr models verify`, then `cxr models pull {entry.name}` again."
        ) from exc


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
    model, manifest = _load_installed(name, weights_dir)  # safetensors only: no pickle at serve time
    xrv = _xrv()
    key = XRV_MODELS[name]
    # DenseNet: norm5 is the last op of the last dense block's output; its (ReLU'd) activations are
    # what the global pooling and classifier see, so it is the Grad-CAM layer.
    cam_layer = model.model.layer4 if key.startswith("resnet") else model.features.norm5
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
        version=f"{key}-sha256:{manifest.sha256[:12]}",
        weights_sha256=manifest.sha256,
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
        # TorchXRayVision's weights were trained and evaluated on adult datasets (NIH, CheXpert,
        # MIMIC, PadChest, ...): a child's film is flagged, never triaged urgent
        validated_population=ADULT,
    )
