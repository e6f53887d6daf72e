"""Inference engines: one batched forward pass -> (probabilities, cam-layer feature map).

- TorchEngine: eager PyTorch. Heatmaps use Grad-CAM through autograd (ml/explain.py).
- OnnxEngine: the network exported once to ONNX (cached on disk, keyed by the sha256 of its
  weights) and run by ONNX Runtime, with the cam layer's feature map as a second output. Heatmaps
  are then computed in numpy from that feature map and the linear head's weights (`CamHead`),
  which equals Grad-CAM up to a positive factor for "[ReLU] -> global average pool -> linear ->
  monotone" heads (derivation in `CamHead`); models whose head we do not recognise keep the torch
  Grad-CAM path for the requests that ask for heatmaps.

The export is checked against torch at every load (max abs difference of the probabilities on a
few real radiographs when ../shared/data is present, generated images otherwise); when it fails
the check or the export itself fails, the model is served by torch and a warning is logged.

Threads: ONNX Runtime keeps an intra-op thread pool per session and concurrent Run() calls on one
session contend for it, so each pool worker thread gets its own session, sized to that thread's
torch thread count (the inference pool sets it to cores // workers).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ml.models.base import LoadedModel

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnx")
PRECISIONS = ("fp32", "int8")
EQUIVALENCE_TOL = 1e-4  # max abs difference of probabilities, ONNX vs torch
OPSET = 17
_EXPORT_FORMAT = "cxr-onnx-3"  # bump when the export wrapper changes (invalidates cached files)


@dataclass(frozen=True)
class CamHead:
    """A head of the form  features -> [ReLU] -> global average pool -> linear -> monotone g.

    For class c, d score / d A_k(i, j) = g'(z_c) * W[c, k] * 1[A_k(i, j) > 0 if relu] / (h * w).
    Grad-CAM's channel weight is the spatial mean of that gradient, so
        alpha_k = g'(z_c) / (h * w) * W[c, k] * frac_k,   frac_k = mean(1[A_k > 0]) (1 without ReLU),
    and since g' > 0 (sigmoid, temperature, TorchXRayVision's op_norm are all increasing) the
    Grad-CAM map relu(sum_k alpha_k A_k) is a positive multiple of relu(sum_k W[c, k] frac_k A_k):
    after the 0..1 normalisation both are the same map, computed here without autograd.
    """

    weight: np.ndarray  # (labels, channels) float32, rows in the model's label order
    relu_before_pool: bool

    def cam(self, features: np.ndarray, label_index: int, size: int, probability: float) -> np.ndarray | None:
        """features (C, h, w) -> map (size, size) in 0..1, or None where Grad-CAM gives none."""
        if not 0.0 < probability < 1.0:  # saturated output: Grad-CAM's gradient vanishes
            return None
        weights = self.weight[label_index].astype(np.float32)
        if self.relu_before_pool:
            weights = weights * (features > 0).mean(axis=(1, 2), dtype=np.float32)
        cam = np.maximum(np.tensordot(weights, features, axes=(0, 0)), 0.0).astype(np.float32)
        cam = _upsample_bilinear(cam, size)
        peak = float(cam.max())
        if not np.isfinite(peak) or peak <= 0.0:
            return None
        return np.clip(cam / peak, 0.0, 1.0).astype(np.float32, copy=False)


def _upsample_bilinear(cam: np.ndarray, size: int) -> np.ndarray:
    """Same as F.interpolate(mode='bilinear', align_corners=False) (what torch Grad-CAM uses)."""
    t = torch.from_numpy(np.ascontiguousarray(cam))[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def linear_cam_head(model: LoadedModel) -> CamHead | None:
    """The CamHead of a model we know to have one, else None (then heatmaps use torch Grad-CAM)."""
    net = model.network
    from ml.models.untrained import SmallCNN

    if isinstance(net, SmallCNN) and model.cam_layer is net.features[-1]:
        return CamHead(_np(net.head.weight), relu_before_pool=False)
    try:
        from ml.models.bundled import PneumoniaNet
    except ImportError:  # pragma: no cover - bundled model module absent
        PneumoniaNet = None  # noqa: N806
    if PneumoniaNet is not None and isinstance(net, PneumoniaNet) and model.cam_layer is net.cam_layer:
        # feature_map -> mean -> dropout (identity in eval) -> linear -> /T -> sigmoid
        return CamHead(_np(net.head.weight), relu_before_pool=False)
    inner = getattr(net, "model", None)
    keep = getattr(net, "keep", None)
    if inner is not None and keep is not None:
        idx = keep.cpu().numpy()
        classifier = getattr(inner, "classifier", None)
        features = getattr(inner, "features", None)
        if isinstance(classifier, nn.Linear) and features is not None and model.cam_layer is getattr(features, "norm5", None):
            # xrv DenseNet: norm5 -> F.relu -> adaptive avg pool -> classifier -> sigmoid -> op_norm
            return CamHead(_np(classifier.weight)[idx], relu_before_pool=True)
        resnet = getattr(inner, "model", None)
        fc = getattr(resnet, "fc", None)
        if isinstance(fc, nn.Linear) and model.cam_layer is getattr(resnet, "layer4", None):
            # xrv ResNet: layer4 (ends in ReLU) -> avgpool -> fc -> sigmoid -> op_norm
            return CamHead(_np(fc.weight)[idx], relu_before_pool=False)
    return None


def _np(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------------------------- engines

_CALL = threading.local()


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Within this block, in this thread, ONNX Runtime runs with `threads` intra-op threads (None: the
    worker's share, torch.get_num_threads()). The inference pool widens a batch to every core when no
    other batch is running, so a lone request is not held to one core while the other idles."""
    previous = getattr(_CALL, "threads", None)
    _CALL.threads = threads
    try:
        yield
    finally:
        _CALL.threads = previous



class TorchEngine:
    """Eager torch; the Analyzer runs it under CamCapture so Grad-CAM can follow."""

    name = "torch"
    exports_features = False

    def __init__(self, model: LoadedModel) -> None:
        self._model = model


class _WithFeatures(nn.Module):
    """network(x) plus the cam layer's output, as two graph outputs (for the ONNX export)."""

    def __init__(self, network: nn.Module, cam_layer: nn.Module) -> None:
        super().__init__()
        self.network = network
        self._features: list[torch.Tensor] = []
        cam_layer.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor:
        # Export the layer's own output, and hand the rest of the network a copy: TorchXRayVision's
        # DenseNet applies an in-place ReLU next, which would otherwise be traced into this output.
        self._features.append(out)
        return out.clone()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._features.clear()
        probs = self.network(x)
        return probs, self._features[-1]


def weights_digest(model: LoadedModel) -> str:
    """sha256 of everything that defines the exported graph: weights, buffers, labels, size."""
    digest = hashlib.sha256()
    digest.update(f"{_EXPORT_FORMAT}|{model.info.name}|{model.input_size}|{','.join(model.labels)}|".encode())
    digest.update(f"torch {torch.__version__}|".encode())
    for key, tensor in sorted(model.network.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_onnx(model: LoadedModel, path: Path) -> None:
    """Export `model` with outputs (probs, features) to `path` (atomically: tmp file + rename)."""
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _WithFeatures(model.network, model.cam_layer).eval()
    handle_count = len(model.cam_layer._forward_hooks)
    example = torch.zeros(1, 1, model.input_size, model.input_size)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation / tracer notices
            torch.onnx.export(
                wrapper, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                input_names=["x"], output_names=["probs", "features"],
                dynamic_axes={"x": {0: "n"}, "probs": {0: "n"}, "features": {0: "n"}},
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        # drop the wrapper's hook (the last one registered) so the network is as we found it
        hooks = model.cam_layer._forward_hooks
        while len(hooks) > handle_count:
            hooks.popitem()


class OnnxEngine:
    name = "onnx"
    exports_features = True

    def __init__(self, model_path: Path, *, precision: str = "fp32") -> None:
        import onnxruntime as ort

        self._ort = ort
        self._path = str(model_path)
        self.precision = precision
        self._local = threading.local()
        self._sessions: list[object] = []

    def _session(self):
        threads = getattr(_CALL, "threads", None) or max(1, torch.get_num_threads())
        sessions = getattr(self._local, "sessions", None)
        if sessions is None:
            sessions = self._local.sessions = {}
        session = sessions.get(threads)  # one per (worker thread, intra-op thread count)
        if session is None:
            ort = self._ort
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Spinning threads steal the CPU from the other workers and from decoding on a small box.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(self._path, options, providers=["CPUExecutionProvider"])
            sessions[threads] = session
            self._sessions.append(session)
        return session

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, features = self._session().run(None, {"x": np.ascontiguousarray(batch, dtype=np.float32)})
        return probs, features

    def pooled(self, batch: np.ndarray) -> np.ndarray:
        """(N, D) global-average-pooled cam-layer features of a (N, 1, S, S) batch."""
        return self.forward(batch)[1].mean(axis=(2, 3))


def check_images(size: int, count: int = 4) -> np.ndarray:
    """(count, 1, size, size) model inputs: real radiographs when the shared data is present."""
    from PIL import Image

    from ml.preprocess import to_model_input

    root = Path(os.environ.get("CXR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    folder = root / "nih_cxr14_fullres" / "images"
    arrays: list[np.ndarray] = []
    if folder.is_dir():
        for file in sorted(folder.glob("*.png"))[:count]:
            with Image.open(file) as img:
                img.draft("L", (2 * size, 2 * size))
                pixels = np.asarray(img.convert("L").reduce(max(1, min(img.size) // (2 * size))), dtype=np.float32)
            arrays.append(to_model_input(pixels / 255.0, size)[0])
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    while len(arrays) < count:  # generated: chest-like gradients plus noise
        base = 0.5 + 0.3 * np.sin(3 * xx + len(arrays)) * np.cos(2 * yy) + 0.05 * rng.standard_normal((size, size))
        arrays.append(to_model_input(np.clip(base, 0, 1).astype(np.float32), size)[0])
    return np.stack(arrays).astype(np.float32)


def torch_forward(model: LoadedModel, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.network(torch.from_numpy(batch)).numpy()


def build_engine(
    model: LoadedModel, engine: str, *, cache_dir: Path | None, precision: str = "fp32"
) -> TorchEngine | OnnxEngine:
    """The requested engine; torch (with a logged warning) when ONNX cannot serve this model faithfully.

    precision "int8" (ONNX only) uses the int8 model `cxr quantize` validated for these weights, and
    fp32 with a logged warning when there is none or validation rejected it.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if engine == "torch":
        if precision != "fp32":
            log.warning("CXR_PRECISION=%s needs CXR_ENGINE=onnx; serving fp32 torch", precision)
        return TorchEngine(model)
    try:
        path = cached_export(model, cache_dir)
        onnx_engine = OnnxEngine(path)
        batch = check_images(model.input_size)
        diff = float(np.abs(onnx_engine.forward(batch)[0] - torch_forward(model, batch)).max())
    except Exception as exc:  # any exporter / runtime failure: serve with torch instead
        log.warning("ONNX engine unavailable for %s (%s: %s); serving with torch", model.info.name, type(exc).__name__, exc)
        return TorchEngine(model)
    if not diff <= EQUIVALENCE_TOL:
        log.warning(
            "ONNX export of %s differs from torch by %.2g (> %.0e) on the check images; serving with torch",
            model.info.name, diff, EQUIVALENCE_TOL,
        )
        return TorchEngine(model)
    log.info("Serving %s with ONNX Runtime (max |p_onnx - p_torch| = %.1e)", model.info.name, diff)
    if precision == "int8":
        from ml.quantize import accepted_int8

        int8, why = accepted_int8(path)
        if int8 is None:
            log.warning("CXR_PRECISION=int8 for %s: %s; serving fp32", model.info.name, why)
        else:
            log.info("Serving %s as validated int8 (%s)", model.info.name, int8.name)
            return OnnxEngine(int8, precision="int8")
    return onnx_engine


def cached_export(model: LoadedModel, cache_dir: Path | None) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else Path("~/.cxr/onnx-cache").expanduser()
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model.info.name)
    path = folder / f"{safe}-{weights_digest(model)[:32]}.onnx"
    if not path.is_file():
        log.info("Exporting %s to ONNX at %s (once per weights)", model.info.name, path)
        export_onnx(model, path)
    return path


class OnnxFeatureGate:
    """An OOD gate that scores pooled backbone features (the bundled FeatureGate) with that backbone
    run by ONNX Runtime instead of eager torch: used when the served model is not the gate's own
    network (e.g. a TorchXRayVision model behind the bundled gate). Same decisions as the torch gate
    up to the export tolerance."""

    def __init__(self, gate: object, engine: OnnxEngine, input_size: int) -> None:
        self._gate = gate
        self._engine = engine
        self._size = input_size

    def check(self, image):  # -> OODResult
        from ml.preprocess import to_model_input

        x, _ = to_model_input(image.pixels, self._size)
        _, features = self._engine.forward(x[None])
        return self._gate.check_features(image, features[0].mean(axis=(1, 2)), self._engine.pooled)  # type: ignore[attr-defined]


def onnx_default_gate(cache_dir: Path | None):  # -> OODGate
    """The bundled OOD gate, its backbone on ONNX Runtime when that export passes the check;
    otherwise the plain (torch) bundled gate."""
    from ml.models.bundled import load_bundled

    gate_model = load_bundled()
    gate = gate_model.ood_gate
    head = linear_cam_head(gate_model)
    if not callable(getattr(gate, "check_features", None)) or head is None or head.relu_before_pool:
        return gate
    engine = build_engine(gate_model, "onnx", cache_dir=cache_dir)
    if not isinstance(engine, OnnxEngine):
        return gate
    return OnnxFeatureGate(gate, engine, gate_model.input_size)
