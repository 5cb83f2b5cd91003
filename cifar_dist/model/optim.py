"""Optimizers, the learning rate as a pure function of the global step, and the loss."""

from __future__ import annotations

import bisect
import math

import torch


def use_fused(train_cfg, device) -> bool:
    """``train.optimizer_impl``: auto fuses on GPUs, where one kernel per step replaces many
    and GradScaler hands the skip decision to the kernel instead of reading it on the host."""
    if train_cfg.optimizer_impl == "auto":
        return torch.device(device).type == "cuda"
    return train_cfg.optimizer_impl == "fused"


def build_optimizer(params, train_cfg, device="cpu") -> torch.optim.Optimizer:
    """Adam (L2 in the gradient, as the paper), AdamW, or SGD with (Nesterov) momentum."""
    t = train_cfg
    kernels = {"fused": True} if use_fused(t, device) else {}
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, **kernels)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, **kernels)
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=t.lr,
            momentum=t.momentum,
            nesterov=t.nesterov and t.momentum > 0,
            weight_decay=t.weight_decay,
            **kernels,
        )
    raise ValueError(f"unknown optimizer {t.optimizer!r}")


def lr_at(step: int, train_cfg, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based); depends on nothing else.

    With ``schedule_unit: epoch`` the rate is constant within an epoch and
    follows the epoch index, like the paper's LambdaLR stepped once per epoch
    (so its first epoch runs at lr 0). The horizon is always ``train.epochs``;
    ``train.max_steps`` only stops early.
    """
    t = train_cfg
    if t.schedule_unit == "epoch":
        pos, warm, total = step // steps_per_epoch, t.warmup_epochs, t.epochs
    else:
        pos, warm, total = step, t.warmup_epochs * steps_per_epoch, t.epochs * steps_per_epoch
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "warmup_cosine":
        if pos < warm:
            return t.lr * pos / warm
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * (pos - warm) / max(total - warm, 1e-12)))
    if t.schedule == "onecycle":  # triangular: 0 -> lr at the end of warm-up -> 0 at the end
        if pos < warm:
            return t.lr * pos / warm
        return t.lr * max(0.0, (total - pos) / max(total - warm, 1e-12))
    if t.schedule == "step":
        epoch = step // steps_per_epoch
        return t.lr * t.gamma ** bisect.bisect_right(sorted(t.milestones), epoch)
    raise ValueError(f"unknown schedule {t.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
