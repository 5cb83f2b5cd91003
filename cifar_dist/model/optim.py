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
    """The optimizer's parameters, built once: with ``train.no_decay`` empty and
    ``train.norm_lr_scale`` 1, the model's parameters as one group (the paper's recipe,
    unchanged). Otherwise groups by what sets a parameter apart: ``no_decay`` names it (norm:
    every parameter of a normalization layer; bias: every parameter named ``bias``), which gives
    it weight_decay 0; it belongs to a normalization layer while ``norm_lr_scale`` is not 1,
    which gives it ``lr_scale`` (read by ``set_lr``) and weight_decay / that scale. Each group
    keeps the model's parameter order; an empty group is left out."""
    scale = train_cfg.norm_lr_scale
    if not train_cfg.no_decay and scale == 1.0:
        return list(model.parameters())
    undecayed: set[int] = set()
    norms: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_LAYERS)
        for name, p in module.named_parameters(recurse=False):
            if is_norm:
                norms.add(id(p))
            if ("norm" in train_cfg.no_decay and is_norm) or ("bias" in train_cfg.no_decay and name == "bias"):
                undecayed.add(id(p))
    scaled = norms if scale != 1.0 else set()
    groups: list[dict] = []
    params = list(model.parameters())  # each shared parameter once
    for is_scaled in (False, True):
        for decayed in (True, False):
            members = [p for p in params if (id(p) in scaled) == is_scaled and (id(p) not in undecayed) == decayed]
            if not members:
                continue
            group: dict = {"params": members}
            if not decayed:
                group["weight_decay"] = 0.0
            elif is_scaled:
                group["weight_decay"] = train_cfg.weight_decay / scale
            if is_scaled:
                group["lr_scale"] = scale
            groups.append(group)
    return groups


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


def schedule_steps(train_cfg, steps_per_epoch: int) -> int:
    """Optimizer steps in ``train.epochs`` epochs: ceil(epochs x steps per epoch), so that a
    fractional epoch count (airbench's 9.9) ends inside the last epoch."""
    return math.ceil(train_cfg.epochs * steps_per_epoch - 1e-9)


def lr_at(step: int, train_cfg, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based); depends on nothing else.

    With ``schedule_unit: epoch`` the rate is constant within an epoch and
    follows the epoch index, like the paper's LambdaLR stepped once per epoch
    (so its first epoch runs at lr 0). The horizon is always ``train.epochs``
    (``schedule_steps``); ``train.max_steps`` only stops early.
    """
    t = train_cfg
    if t.schedule_unit == "epoch":
        pos, warm, total = step // steps_per_epoch, t.warmup_epochs, t.epochs
    else:
        pos, warm, total = step, t.warmup_epochs * steps_per_epoch, schedule_steps(t, steps_per_epoch)
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "warmup_cosine":
        if pos < warm:
            return t.lr * pos / warm
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * (pos - warm) / max(total - warm, 1e-12)))
    if t.schedule == "onecycle":  # triangular: lr x start -> lr at the end of warm-up -> lr x end
        start, end = t.lr_start_factor, t.lr_end_factor
        if pos < warm:
            return t.lr * (start + (1.0 - start) * pos / warm)
        frac = min(1.0, (pos - warm) / max(total - warm, 1e-12))
        return t.lr * (1.0 - (1.0 - end) * frac)
    if t.schedule == "step":
        epoch = step // steps_per_epoch
        return t.lr * t.gamma ** bisect.bisect_right(sorted(t.milestones), epoch)
    raise ValueError(f"unknown schedule {t.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group follows the one schedule, times its ``lr_scale`` (``param_groups``:
    the normalization layers' under ``train.norm_lr_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
