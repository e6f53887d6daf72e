"""An ensemble on ONNX Runtime: every member is exported and checked like a single model
(ml/engine.build_engine), and a request group's batch runs once through each member's session.

forward() returns the ensemble's mean probabilities (ml/models/ensemble.py) and, per row, every
member's (feature map, probabilities); EnsembleCamHead averages the members' CAMs of a finding
(each normalised to 0..1 by CamHead.cam) over the members that output it and have a map for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ml.engine import CamHead, OnnxEngine, build_engine, linear_cam_head
from ml.errors import ModelUnavailable
from ml.models.base import LoadedModel
from ml.models.ensemble import combine, mean_probabilities, resize_input


@dataclass(frozen=True)
class _Member:
    model: LoadedModel
    engine: OnnxEngine
    head: CamHead | None


class EnsembleEngine(OnnxEngine):
    name = "onnx"
    exports_features = True

    def __init__(self, model: LoadedModel, *, cache_dir: Path | None, precision: str = "fp32") -> None:
        # no session of its own: one per member
        self.precision = precision
        self._combo = combine(list(model.members))
        self._members: list[_Member] = []
        for m in model.members:
            engine = build_engine(m, "onnx", cache_dir=cache_dir, precision=precision)
            if not isinstance(engine, OnnxEngine):
                raise ModelUnavailable(
                    f"ensemble member {m.info.name!r} could not be served by ONNX Runtime (see the log); "
                    "every member of an ensemble runs on ONNX Runtime"
                )
            self._members.append(_Member(m, engine, linear_cam_head(m)))
        if precision == "int8" and any(getattr(x.engine, "precision", "fp32") != "int8" for x in self._members):
            self.precision = "mixed"

    @property
    def member_count(self) -> int:
        return len(self._members)

    def forward(self, batch: np.ndarray):  # -> (probs (N, L), per-row member outputs)
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        member_probs, member_feats = [], []
        for member in self._members:
            xm = resize_input(x, member.model.input_size).numpy()
            probs, feats = member.engine.forward(xm)
            member_probs.append(torch.from_numpy(probs))
            member_feats.append((probs, feats))
        mean = mean_probabilities(member_probs, self._combo).numpy()
        rows = [[(feats[row], probs[row]) for probs, feats in member_feats] for row in range(batch.shape[0])]
        return mean, rows


@dataclass(frozen=True)
class EnsembleCamHead:
    """CamHead's interface over an ensemble: mean of the members' 0..1 maps for one finding."""

    engine: EnsembleEngine
    relu_before_pool: bool = False  # never used to share a gate: ensembles take the server's gate

    def cam(self, row_outputs, label_index: int, size: int, probability: float) -> np.ndarray | None:
        maps = []
        for member, idx, (feats, probs) in zip(self.engine._members, self.engine._combo.member_index, row_outputs,
                                               strict=True):
            if member.head is None or label_index not in idx:
                continue
            j = idx.index(label_index)
            cam = member.head.cam(feats, j, size, float(probs[j]))
            if cam is not None:
                maps.append(cam)
        if not maps:
            return None
        mean = np.mean(maps, axis=0).astype(np.float32)
        peak = float(mean.max())
        return None if peak <= 0.0 else np.clip(mean / peak, 0.0, 1.0)
