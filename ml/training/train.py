"""`cxr train`: candidates -> selection -> full training -> calibration -> OOD gate -> shipped files.

One command does all of it from the same seed, checkpointing every epoch (and after the candidate
budget) into OUT/ckpt so an interrupted run resumes where it stopped. Every random draw is seeded
per (seed, candidate, step), so a resumed run follows the same path as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ml.models.bundled import PneumoniaNet
from ml.training.data import Record, build_cache, from_uint8
from ml.training.metrics import auroc

Log = Callable[[str], None]


@dataclass
class TrainConfig:
    data_dir: Path
    out_dir: Path
    seed: int = 0
    size: int = 160
    candidates: tuple[str, ...] = ("mobilenet_v2", "efficientnet_lite0")
    candidate_steps: int = 24  # equal short budget per candidate (steps of batch_size images)
    epochs: int = 3
    batch_size: int = 32
    frozen_layers: int = 7
    lr: float = 3e-4
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    threads: int = 2
    val_fraction: float = 0.2
    max_steps_per_epoch: int | None = None  # smoke tests only
    stage: str = "all"  # "train" stops after training; "all" also calibrates and exports
    extra: dict[str, Any] = field(default_factory=dict)


def _role_index(records: list[Record], role: str, datasets: tuple[str, ...] | None = None) -> np.ndarray:
    return np.array(
        [i for i, r in enumerate(records) if r.role == role and (datasets is None or r.dataset in datasets)],
        dtype=np.int64,
    )


def augment(x01: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light, label-preserving jitter: small affine + aspect, brightness/contrast/gamma. Input (N,1,S,S) in [0,1]."""
    n = x01.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    ang = u(-7.0, 7.0) * math.pi / 180.0
    scale = u(0.92, 1.08)
    tx, ty = u(-0.05, 0.05), u(-0.05, 0.05)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    # Aspect jitter: the Kermany training JPEGs were squashed to 224x224, while the server centre-
    # crops the original (often 1.2-1.4:1 landscape) film. Zooming one axis by 1/a reproduces that
    # crop on half the batch, so training sees both framings.
    aspect = 1.0 / u(1.0, 1.4)
    which = torch.rand(n, generator=gen)
    sx = torch.where(which < 0.35, aspect, torch.ones(n))
    sy = torch.where((which >= 0.35) & (which < 0.5), aspect, torch.ones(n))
    theta = torch.stack([torch.stack([sx * cos, -sx * sin, tx], 1), torch.stack([sy * sin, sy * cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    x = F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = u(0.85, 1.15).view(n, 1, 1, 1)
    bright = u(-0.06, 0.06).view(n, 1, 1, 1)
    gamma = u(0.85, 1.15).view(n, 1, 1, 1)
    x = ((x - 0.5) * contrast + 0.5 + bright).clamp(0.0, 1.0)
    return x.clamp_min(1e-6) ** gamma


def _to_xrv(x01: torch.Tensor) -> torch.Tensor:
    return x01 * 2048.0 - 1024.0


@torch.no_grad()
def predict_logits(net: PneumoniaNet, images: np.ndarray, idx: np.ndarray, batch: int = 64) -> np.ndarray:
    net.eval()
    out = []
    for s in range(0, len(idx), batch):
        x = torch.from_numpy(from_uint8(images[idx[s : s + batch]]))
        out.append(net.logits(x)[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def predict_features(net: PneumoniaNet, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Pooled backbone features for (N, 1, S, S) float32 inputs in [-1024, 1024]."""
    net.eval()
    out = [net.pooled(torch.from_numpy(x[s : s + batch])).numpy() for s in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, 1280), dtype=np.float32)


def balanced_epoch(train_idx: np.ndarray, labels: np.ndarray, datasets: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """One epoch's shuffled indices: per dataset, the majority class subsampled to the minority's size.

    Class balance by sampling (Kermany is 74% pneumonia) and a shorter epoch on two CPU cores; a
    different majority subset each epoch, so all images are seen over the run.
    """
    chosen = []
    for ds in sorted(set(datasets[train_idx])):
        idx = train_idx[datasets[train_idx] == ds]
        pos, neg = idx[labels[idx] == 1], idx[labels[idx] != 1]
        k = min(len(pos), len(neg)) or max(len(pos), len(neg))
        chosen += [rng.choice(pos, min(k, len(pos)), replace=False), rng.choice(neg, min(k, len(neg)), replace=False)]
    sel = np.concatenate(chosen)
    return sel[rng.permutation(len(sel))]


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def _set_train_mode(net: PneumoniaNet, frozen: int) -> None:
    net.train()
    for layer in net.layers[:frozen]:
        layer.eval()  # frozen layers keep their pretrained BatchNorm statistics
        for p in layer.parameters():
            p.requires_grad_(False)


def train_candidate(cfg: TrainConfig, arch: str, images: np.ndarray, records: list[Record], until_step: int | None,
                    log: Log) -> tuple[PneumoniaNet, list[dict[str, Any]]]:
    """Train `arch` up to global step `until_step` (None: all cfg.epochs) on one warmup+cosine schedule.

    Resumes from OUT/ckpt/<arch>.pt. Shuffling, augmentation and dropout are seeded per step, so a
    run resumed at any checkpoint follows the same path as an uninterrupted one.
    """
    ckpt_dir = cfg.out_dir / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / f"{arch}.pt"
    torch.manual_seed(cfg.seed)
    net = PneumoniaNet(arch, pretrained=True, image_size=cfg.size)
    head_params = list(net.head.parameters())
    body_params = [p for n, p in net.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW(
        [{"params": body_params, "lr": cfg.lr, "base": cfg.lr}, {"params": head_params, "lr": cfg.head_lr, "base": cfg.head_lr}],
        weight_decay=cfg.weight_decay,
    )
    history: list[dict[str, Any]] = []
    start_step = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step, history = state["step"], state["history"]
        log(f"[{arch}] resumed from {ckpt_path} at step {start_step}")

    train_idx = _role_index(records, "train")
    cal_idx = _role_index(records, "cal")
    labels = np.array([r.label for r in records], dtype=np.float32)
    datasets = np.array([r.dataset for r in records])
    epoch_size = len(balanced_epoch(train_idx, labels, datasets, np.random.default_rng(0)))
    steps_per_epoch = math.ceil(epoch_size / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    end_step = total_steps if until_step is None else min(until_step, total_steps)
    arch_seed = cfg.seed * 100_003 + sum(ord(c) for c in arch) * 101

    def checkpoint(step: int, entry: dict[str, Any]) -> None:
        history.append(entry)
        log(f"[{arch}] {json.dumps(entry)}")
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "step": step, "history": history}, tmp)
        tmp.replace(ckpt_path)

    order: np.ndarray | None = None
    order_epoch = -1
    t0, seen, loss_sum = time.time(), 0, 0.0
    _set_train_mode(net, cfg.frozen_layers)
    for step in range(start_step, end_step):
        epoch, s = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order = balanced_epoch(train_idx, labels, datasets, np.random.default_rng(arch_seed + epoch))
            order_epoch = epoch
        assert order is not None
        torch.manual_seed(arch_seed * 7 + step)  # dropout
        gen = torch.Generator().manual_seed(arch_seed * 13 + step)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total_steps, g["base"], cfg.warmup_steps)
        bidx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
        n_pos = float(labels[bidx].sum())
        pos_weight = torch.tensor([(len(bidx) - n_pos) / max(n_pos, 1.0)]) if 0 < n_pos < len(bidx) else None
        x01 = torch.from_numpy(images[bidx].astype(np.float32)[:, None] / 255.0)
        x = _to_xrv(augment(x01, gen))
        y = torch.from_numpy(labels[bidx])[:, None]
        loss = F.binary_cross_entropy_with_logits(net.logits(x, frozen_layers=cfg.frozen_layers), y, pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(bidx)
        loss_sum += float(loss.detach()) * len(bidx)
        done = step + 1
        if done % 20 == 0:
            log(f"[{arch}] step {done}/{total_steps} (epoch {epoch + 1}/{cfg.epochs}) "
                f"loss {loss_sum / seen:.4f} {seen / (time.time() - t0):.1f} img/s")
        if done % steps_per_epoch == 0 or done == end_step:
            cal_auc = auroc(labels[cal_idx], predict_logits(net, images, cal_idx))
            checkpoint(done, {"step": done, "epoch": round(done / steps_per_epoch, 3),
                              "train_loss": loss_sum / max(seen, 1), "cal_auroc": cal_auc,
                              "seconds": round(time.time() - t0, 1)})
            t0, seen, loss_sum = time.time(), 0, 0.0
            _set_train_mode(net, cfg.frozen_layers)
    return net.eval(), history


def run(cfg: TrainConfig, log: Log = print) -> dict[str, Any]:
    """The whole `cxr train`; returns the manifest it wrote (or the training summary for stage=train)."""
    torch.set_num_threads(cfg.threads)
    t_start = time.time()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    images, records = build_cache(cfg.data_dir, cfg.out_dir / "cache", cfg.size, seed=cfg.seed,
                                  val_fraction=cfg.val_fraction, log=log)
    if not len(_role_index(records, "train")):
        raise ValueError(f"no training images found under {cfg.data_dir}")
    log(f"cache ready: {len(records)} images at {cfg.size}px ({time.time() - t_start:.0f}s)")

    comparison = {}
    for arch in cfg.candidates:
        _, hist = train_candidate(cfg, arch, images, records, cfg.candidate_steps, log)
        comparison[arch] = [h for h in hist if h["step"] <= cfg.candidate_steps][-1:]
    best = max(cfg.candidates, key=lambda a: comparison[a][-1]["cal_auroc"]
               if not math.isnan(comparison[a][-1]["cal_auroc"]) else -1.0)
    log(f"candidate comparison (cal AUROC after {cfg.candidate_steps} steps each): "
        + ", ".join(f"{a}={comparison[a][-1]['cal_auroc']:.4f}" for a in cfg.candidates) + f" -> {best}")
    net, history = train_candidate(cfg, best, images, records, None, log)
    summary = {"selected": best, "comparison": comparison, "history": history}
    (cfg.out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.stage == "train":
        return summary

    from ml.training.finalize import finalize

    return finalize(cfg, net, images, records, summary, log, started=t_start)
