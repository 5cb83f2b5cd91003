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


# Normalization layers whose affine weights and biases ``train.no_decay: [norm]`` leaves
# undecayed, by their public classes: BatchNorm (GroupBatchNorm2d is a BatchNorm2d; a lazy
# one becomes its class once built), SyncBatchNorm, InstanceNorm, and the GroupNorm,
# LayerNorm and RMSNorm a user's model may hold.
NORM_LAYERS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.RMSNorm,
)


def param_groups(model: torch.nn.Module, train_cfg) -> list:
    """The optimizer's parameters, built once: with ``train.no_decay`` empty, the model's
    parameters as one group (the paper's recipe, unchanged); else a group of the parameters
    named by ``no_decay`` (norm: every parameter of a normalization layer; bias: every
    parameter named ``bias``) with weight_decay 0, and one of the rest with
    ``train.weight_decay``. Each keeps the model's parameter order."""
    if not train_cfg.no_decay:
        return list(model.parameters())
    undecayed: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if ("norm" in train_cfg.no_decay and isinstance(module, NORM_LAYERS)) or (
                "bias" in train_cfg.no_decay and name == "bias"
            ):
                undecayed.add(id(p))
    params = list(model.parameters())  # each shared parameter once
    decayed = [p for p in params if id(p) not in undecayed]
    free = [p for p in params if id(p) in undecayed]
    # An empty group is left out: a model with nothing no_decay names keeps one group.
    groups: list[dict] = [{"params": decayed}] if decayed else []
    return groups + ([{"params": free, "weight_decay": 0.0}] if free else [])


def build_optimizer(params, train_cfg, device="cpu") -> torch.optim.Optimizer:
    """Adam (L2 in the gradient, as the paper), AdamW, or SGD with (Nesterov) momentum, over
    ``params``: parameters, or the groups of ``param_groups`` (a group's own weight_decay wins)."""
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
    """Every parameter group follows the one schedule (no_decay groups differ in decay alone)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
