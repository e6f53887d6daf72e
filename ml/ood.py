"""The bundled out-of-distribution gate: is this a frontal chest radiograph at all?

Three checks, cheapest first; the first that fails gives the reason:
1. metadata: a CT/MR/US/... DICOM modality, a lateral view position, a colour image
   (ingest's `colorfulness`: radiographs saved as RGB are grey), a blank image;
2. a logistic "chest vs not-chest" head on the pneumonia network's pooled backbone features,
   trained on the training radiographs against generated negatives (photos, documents,
   screenshots, noise, CT/MR slices, chest films rotated by 90/180 degrees);
3. a Mahalanobis distance (PCA-whitened) of those features from the training radiographs, which
   catches what the head never saw (anything far from every training film).

Both learned scores are mapped so that 0.5 sits at their own threshold (set on the calibration
chest films so ~99.5% of them pass each check); the gate score is the smaller of the two and an
image passes when it is >= 0.5. The gate shares the classifier's backbone weights, so it adds one
forward pass and no extra download.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.analysis import OODResult
from ml.image import XRayImage
from ml.population import PopulationParams
from ml.population import classify as classify_population
from ml.preprocess import to_model_input

GATE_THRESHOLD = 0.5
# The gate's own heads (chest-vs-not, typicality, population), fitted on every shared source with
# framing variations (ml/training/gate_fit.py); they replace the ood.* tensors of the model file.
GATE_FILE = "cxr-gate-v2.safetensors"
GATE_MANIFEST = "cxr-gate-v2.json"
# Modalities that are never a projection chest radiograph (ingest may refuse some of them already).
NON_RADIOGRAPH_MODALITIES = {"CT", "MR", "US", "NM", "PT", "OT", "XA", "RF", "MG", "OP", "SM", "ES", "IO", "PX", "SEG", "RTDOSE"}
LATERAL_VIEWS = {"LAT", "LL", "RL", "LATERAL", "RLD", "LLD", "XTABLE"}
# ingest's colorfulness is the mean chroma in [0, 1]; grey films stored as RGB are ~0, a film with a
# few coloured annotations stays well below this, photos are typically 0.1-0.4.
MAX_COLORFULNESS = 0.06
# Orientation consistency (issue 11): the orientation head's logit on the film as given ("own") is
# compared with its logits on the same film turned 90/180/270 degrees and inverted. An upright film
# beats every one of its own turned / inverted copies; a turned or inverted film loses to the copy
# that undoes it. gap = best copy's logit - own logit. Numbers from the gate's fit patients only
# (ml/training/gate_orientation.py, films as served and framed as servers see them): the largest gap
# of a fit chest film was -3.5 as served (-2.2 framed), the smallest of a fit turned / inverted copy
# +3.5 (+2.2 framed); the largest own logit of a fit copy that the chest and distance checks let
# through was 8.3 (a framed film turned 180 degrees; 5.5 as served).
# - own >= ORIENT_CONFIDENT (8.3 + the 2.5 margin first set on the as-served copies): upright, no
#   copies needed (~75-85% of real films);
# - 0 <= own: the film alone looks upright; refused when a copy beats it (gap > ORIENT_MARGIN = 0,
#   the midpoint between the fit films' and the fit copies' gaps);
# - own < 0: the film alone looks turned; it passes only when it beats every copy by at least the
#   margin every fit chest film showed as served (gap <= -ORIENT_OVERTURN). Overturning the
#   film-alone verdict takes a clear win: a turned cat scores own -0.05 and beats its copies by 1.1.
ORIENT_MARGIN = 0.0
ORIENT_OVERTURN = 3.5
ORIENT_CONFIDENT = 10.8


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))


@dataclass
class GateParams:
    head_w: np.ndarray  # (D,) logistic weights on raw pooled features
    head_b: float  # bias, already shifted so 0 is the operating threshold
    mean: np.ndarray  # (D,) training-feature mean
    components: np.ndarray  # (K, D) PCA directions
    inv_sd: np.ndarray  # (K,) 1 / sqrt(PCA variance)
    dist_threshold: float  # Mahalanobis distance (RMS per component) at the gate threshold
    dist_scale: float  # softness of the distance score around its threshold
    # orientation head (gate v2): upright film vs the same films turned or inverted; 0 = threshold
    orient_w: np.ndarray | None = None
    orient_b: float = 0.0

    def to_state(self) -> dict[str, torch.Tensor]:
        return {
            "ood.head_w": torch.from_numpy(self.head_w.astype(np.float32)),
            "ood.head_b": torch.tensor([self.head_b], dtype=torch.float32),
            "ood.mean": torch.from_numpy(self.mean.astype(np.float32)),
            "ood.components": torch.from_numpy(self.components.astype(np.float32)),
            "ood.inv_sd": torch.from_numpy(self.inv_sd.astype(np.float32)),
            "ood.dist": torch.tensor([self.dist_threshold, self.dist_scale], dtype=torch.float32),
        } | ({} if self.orient_w is None else {
            "ood.orient_w": torch.from_numpy(self.orient_w.astype(np.float32)),
            "ood.orient_b": torch.tensor([self.orient_b], dtype=torch.float32),
        })

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> GateParams:
        dist = state["ood.dist"].double().numpy()
        return cls(
            head_w=state["ood.head_w"].double().numpy(),
            head_b=float(state["ood.head_b"][0]),
            mean=state["ood.mean"].double().numpy(),
            components=state["ood.components"].double().numpy(),
            inv_sd=state["ood.inv_sd"].double().numpy(),
            dist_threshold=float(dist[0]),
            dist_scale=float(dist[1]),
            orient_w=state["ood.orient_w"].double().numpy() if "ood.orient_w" in state else None,
            orient_b=float(state["ood.orient_b"][0]) if "ood.orient_b" in state else 0.0,
        )

    def head_logit(self, feats: np.ndarray) -> np.ndarray:
        return feats @ self.head_w + self.head_b

    def distance(self, feats: np.ndarray) -> np.ndarray:
        z = ((feats - self.mean) @ self.components.T) * self.inv_sd
        return np.sqrt(np.mean(z * z, axis=-1))

    def orientation(self, feats: np.ndarray) -> np.ndarray:
        """0..1, 0.5 at its threshold; 1 where there is no orientation head (v1 gates)."""
        if self.orient_w is None:
            return np.ones(len(feats))
        return 1.0 / (1.0 + np.exp(-np.clip(self.orientation_logit(feats), -60, 60)))

    def orientation_logit(self, feats: np.ndarray) -> np.ndarray:
        assert self.orient_w is not None
        return feats @ self.orient_w + self.orient_b

    def scores(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(head score, distance score), each 0..1 with 0.5 at its threshold."""
        head = 1.0 / (1.0 + np.exp(-np.clip(self.head_logit(feats), -60, 60)))
        d = self.distance(feats)
        dist = 1.0 / (1.0 + np.exp(-np.clip((self.dist_threshold - d) / self.dist_scale, -60, 60)))
        return head, dist


def orientation_copies(pixels: np.ndarray) -> list[np.ndarray]:
    """The film turned 90, 180 and 270 degrees and inverted: the copies an upright film must beat."""
    return [np.ascontiguousarray(np.rot90(pixels, k)) for k in (1, 2, 3)] + [1.0 - pixels]


def orientation_edge(own: np.ndarray | float) -> np.ndarray:
    """The gap (best copy's logit - own) above which a film is refused as turned or inverted."""
    return np.where(np.asarray(own) >= 0, ORIENT_MARGIN, -ORIENT_OVERTURN)


def orientation_refused(own: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """The orientation check's verdict from a film's own logit and its gap (what the server decides;
    ml/training/gate_orientation.py measures the rule with this same function)."""
    return (own < ORIENT_CONFIDENT) & (gap > orientation_edge(own))


# (N, 1, S, S) model inputs -> (N, D) pooled backbone features
PooledBatch = Callable[[np.ndarray], np.ndarray]


def metadata_reason(image: XRayImage) -> str | None:
    """A refusal reason from metadata and trivial pixel statistics, or None."""
    meta = image.metadata
    modality = (meta.modality or "").upper()
    if modality in NON_RADIOGRAPH_MODALITIES:
        return f"DICOM modality {modality} is not a projection radiograph"
    view = (meta.view_position or "").upper().replace(" ", "")
    if view in LATERAL_VIEWS:
        return f"view position {meta.view_position} is not a frontal (PA/AP) chest view"
    try:
        colour = float(meta.extra.get("colorfulness", "0") or 0.0)
    except ValueError:
        colour = 0.0
    if colour > MAX_COLORFULNESS:
        return f"the image is in colour (colourfulness {colour:.2f}); radiographs are greyscale"
    px = image.pixels
    if px.size == 0 or float(px.max()) - float(px.min()) < 1e-3:
        return "the image is blank (a single grey level)"
    h, w = px.shape
    if max(h, w) > 4 * min(h, w):
        return f"the image shape {w}x{h} is far from that of a chest radiograph"
    return None


class FeatureGate:
    """OODGate on the pneumonia network's features (see module docstring); it also tells the film's
    population (ml/population.py) from the same features."""

    def __init__(self, network: torch.nn.Module, params: GateParams | None, input_size: int,
                 population: PopulationParams | None = None) -> None:
        self._net = network
        self._params = params
        self._size = input_size
        self._population = population

    @classmethod
    def from_state(cls, network: torch.nn.Module, state: dict[str, torch.Tensor], config: dict[str, Any],
                   input_size: int) -> FeatureGate:
        params = GateParams.from_state(state) if "ood.head_w" in state else None
        return cls(network, params, input_size, PopulationParams.from_state(state))

    def features(self, image: XRayImage) -> np.ndarray:
        return self._torch_pooled(to_model_input(image.pixels, self._size)[0][None])[0]

    def _torch_pooled(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._net.pooled(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).double().numpy()

    def check(self, image: XRayImage) -> OODResult:
        return self._decide(image, lambda: self.features(image), self._torch_pooled)

    def check_features(self, image: XRayImage, pooled: np.ndarray, pooled_batch: PooledBatch | None = None) -> OODResult:
        """check() with the pooled backbone features already computed: the classifier's own forward
        pass sees the same input (to_model_input at the same size) through the same network, so
        the serving pipeline shares it instead of running the backbone twice (ml/pipeline.py).
        `pooled_batch` runs that backbone on the film's turned / inverted copies when the orientation
        check needs them (the caller's ONNX session; eager torch when not given)."""
        return self._decide(image, lambda: np.asarray(pooled, dtype=np.float64), pooled_batch or self._torch_pooled)

    def orientation_score(self, image: XRayImage, feats: np.ndarray, pooled_batch: PooledBatch) -> tuple[float, bool]:
        """(0..1 with 0.5 at the refusal edge, whether the copies were computed): sigmoid of the
        film's own orientation logit when it is confidently upright, else sigmoid(edge - gap) from
        its turned / inverted copies (edge: see ORIENT_MARGIN / ORIENT_OVERTURN)."""
        params = self._params
        if params is None or params.orient_w is None:
            return 1.0, False
        own = float(params.orientation_logit(feats[None])[0])
        if own >= ORIENT_CONFIDENT:
            return _sigmoid(own), False
        batch = np.stack([to_model_input(px, self._size)[0] for px in orientation_copies(image.pixels)])
        best_copy = float(np.max(params.orientation_logit(np.asarray(pooled_batch(batch), dtype=np.float64))))
        return _sigmoid(float(orientation_edge(own)) - (best_copy - own)), True

    def _decide(self, image: XRayImage, pooled: Callable[[], np.ndarray], pooled_batch: PooledBatch) -> OODResult:
        reason = metadata_reason(image)
        if reason is not None:
            return OODResult(passed=False, score=0.0, threshold=GATE_THRESHOLD, reason=reason, check="metadata")
        feats = pooled() if (self._params is not None or self._population is not None) else None
        population = classify_population(image.metadata, feats, self._population)
        if self._params is None or feats is None:  # weights shipped without a gate: metadata checks only
            return OODResult(passed=True, score=1.0, threshold=GATE_THRESHOLD, population=population)
        head, dist = self._params.scores(feats[None])
        head_s, dist_s = float(head[0]), float(dist[0])
        # the copies cost four backbone passes: only for a film the cheaper checks let through
        orient_s, compared = (self.orientation_score(image, feats, pooled_batch)
                              if min(head_s, dist_s) >= GATE_THRESHOLD else (1.0, False))
        score = min(head_s, dist_s, orient_s)
        if score >= GATE_THRESHOLD:
            return OODResult(passed=True, score=score, threshold=GATE_THRESHOLD, population=population,
                             compared_copies=compared)
        if head_s < GATE_THRESHOLD:
            why = "the image does not look like a frontal chest radiograph"
            check = "chest_vs_not"
        elif orient_s < GATE_THRESHOLD:
            why = "the film looks turned or inverted, not an upright frontal chest radiograph as displayed"
            check = "orientation"
        else:
            why = "the image is unlike the chest radiographs the model was trained on"
            check = "distance"
        return OODResult(passed=False, score=score, threshold=GATE_THRESHOLD, reason=why, check=check,
                         population=population, compared_copies=compared)


def load_gate_state(weights_dir: Path) -> dict[str, torch.Tensor] | None:
    """The gate + population heads file (GATE_FILE) after its sha256 check; None when not shipped."""
    import json

    from safetensors.torch import load_file

    from ml.errors import ModelUnavailable
    from ml.models.bundled import sha256_file

    manifest_path = weights_dir / GATE_MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"gate manifest {manifest_path} is unreadable: {exc}") from exc
    path = weights_dir / manifest.get("weights_file", GATE_FILE)
    if not path.is_file():
        raise ModelUnavailable(f"gate weights {path} are missing")
    actual = sha256_file(path)
    if actual != manifest.get("sha256"):
        raise ModelUnavailable(f"gate weights {path} fail their checksum (sha256 {actual[:12]}..., "
                               f"manifest says {str(manifest.get('sha256'))[:12]}...)")
    return load_file(str(path))


def load_default_gate() -> FeatureGate:
    """The gate bundled with cxr:pneumonia-v1 (loads and verifies the shipped weights)."""
    from ml.models.bundled import load_bundled

    gate = load_bundled().ood_gate
    assert isinstance(gate, FeatureGate)
    return gate
