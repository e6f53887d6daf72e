"""Ensembles of registered models: `ensemble:xrv:densenet121-res224-all,xrv:densenet121-res224-chex,...`.

Combination (per finding, over the members that output it, "its members"):
- probability = mean of its members' calibrated probabilities;
- operating point = mean of its members' operating thresholds, the same mean as the probabilities,
  so `detected = mean(p) >= mean(t)`. When every member puts the finding at the same threshold (all
  TorchXRayVision models: 0.5 after op_norm) this is that threshold; a member with another operating
  point (our bundled model, e.g. 0.68) pulls it towards its own;
- heatmap = mean of its members' CAMs, each normalised to 0..1 first (ml/engine_ensemble.py).
The input is preprocessed once at the largest member resolution; a member with a smaller input sees
that tensor resized (bilinear, antialiased), so its probabilities can differ slightly (< 0.01
typically) from the member served alone. The ensemble's OOD gate is the server's default gate.

`network` is a torch module computing exactly that mean (used by CXR_ENGINE=torch and `cxr
evaluate`); served with ONNX, every member runs as its own ONNX Runtime session on the whole batch
(one batch per member per request group), see ml/engine_ensemble.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ml.analysis import ModelInfo
from ml.errors import ModelUnavailable
from ml.models.base import LoadedModel

PREFIX = "ensemble:"


@dataclass(frozen=True)
class Combination:
    labels: tuple[str, ...]
    displays: tuple[str, ...]
    thresholds: tuple[float, ...]
    # per member: for each of its outputs, the ensemble label index it feeds
    member_index: tuple[tuple[int, ...], ...]
    counts: tuple[int, ...]  # members per ensemble label


def combine(members: list[LoadedModel]) -> Combination:
    labels: list[str] = []
    displays: list[str] = []
    sums: list[float] = []
    counts: list[int] = []
    member_index = []
    for m in members:
        idx = []
        for label, display, t in zip(m.labels, m.displays, m.thresholds, strict=True):
            if label not in labels:
                labels.append(label)
                displays.append(display)
                sums.append(0.0)
                counts.append(0)
            j = labels.index(label)
            sums[j] += float(t)
            counts[j] += 1
            idx.append(j)
        member_index.append(tuple(idx))
    return Combination(tuple(labels), tuple(displays), tuple(s / c for s, c in zip(sums, counts, strict=True)),
                       tuple(member_index), tuple(counts))


def resize_input(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def mean_probabilities(member_probs: list[torch.Tensor], combo: Combination) -> torch.Tensor:
    n = member_probs[0].shape[0]
    total = member_probs[0].new_zeros((n, len(combo.labels)))
    for probs, idx in zip(member_probs, combo.member_index, strict=True):
        total = total.index_add(1, torch.tensor(idx, dtype=torch.long), probs)
    return total / torch.tensor(combo.counts, dtype=total.dtype)


class EnsembleNetwork(nn.Module):
    """(N, 1, S, S) -> (N, labels): the per-finding mean over the members that output it."""

    def __init__(self, members: list[LoadedModel], combo: Combination, input_size: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(m.network for m in members)
        self.sizes = [m.input_size for m in members]
        self.combo = combo
        self.input_size = input_size
        self.cam = nn.Identity()  # no single cam layer: CAMs are combined per member (engine_ensemble)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [net(resize_input(x, size)) for net, size in zip(self.members, self.sizes, strict=True)]
        return mean_probabilities(outs, self.combo)


def parse(name: str) -> list[str]:
    members = [m.strip() for m in name.removeprefix(PREFIX).split(",") if m.strip()]
    if len(members) < 2:
        raise ModelUnavailable(f"{name!r}: an ensemble needs at least two members, e.g. "
                               "ensemble:xrv:densenet121-res224-all,xrv:densenet121-res224-chex")
    if len(set(members)) != len(members):
        raise ModelUnavailable(f"{name!r}: a member is named twice")
    if any(m.startswith(PREFIX) for m in members):
        raise ModelUnavailable(f"{name!r}: ensembles cannot be nested")
    return members


def load_ensemble(name: str, *, weights_dir: Path, load_member) -> LoadedModel:
    member_names = parse(name)
    members = [load_member(m, weights_dir=weights_dir) for m in member_names]
    if any(m.info.untrained for m in members):
        raise ModelUnavailable(f"{name!r}: the untrained demo model cannot be an ensemble member")
    combo = combine(members)
    size = max(m.input_size for m in members)
    digest = hashlib.sha256("|".join(f"{m.info.name}@{m.info.version}" for m in members).encode()).hexdigest()
    canonical = PREFIX + ",".join(member_names)
    info = ModelInfo(
        name=canonical,
        version=f"ensemble-{len(members)}-{digest[:12]}",
        software_version=members[0].info.software_version,
        members=tuple(m.info for m in members),
    )
    network = EnsembleNetwork(members, combo, size).eval()
    return LoadedModel(info=info, labels=combo.labels, displays=combo.displays, thresholds=combo.thresholds,
                       input_size=size, network=network, cam_layer=network.cam, members=tuple(members))
