"""Optimizers with their parameter groups, and the learning rate as a pure function of the step."""

from __future__ import annotations

import bisect
import math

import torch


def use_fused(train_cfg, device) -> bool:
    """``train.optimizer_impl``: auto fuses on GPUs, where one kernel replaces many and
    GradScaler's skip decision stays on the device."""
    if train_cfg.optimizer_impl == "auto":
        return torch.device(device).type == "cuda"
    return train_cfg.optimizer_impl == "fused"


# What ``train.no_decay: [norm]`` counts as a normalization layer (GroupBatchNorm2d is a
# BatchNorm2d; a lazy one becomes its class once built).
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
    """The optimizer's parameters: one group by default (the paper's), else groups for
    ``train.no_decay`` (weight_decay 0) and ``train.norm_lr_scale`` (``lr_scale``, weight_decay /
    scale), each in the model's parameter order."""
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
    """Adam (L2 in the gradient, as the paper), AdamW, or SGD with (Nesterov) momentum."""
    t = train_cfg
    kernels = {"fused": True} if use_fused(t, device) else {}
    if t.optimizer in ("adam", "adamw"):
        adam = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
        return adam(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, **kernels)
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
    """Optimizer steps in ``train.epochs``, rounded up so a fractional count (airbench's 9.9)
    ends inside the last epoch."""
    return math.ceil(train_cfg.epochs * steps_per_epoch - 1e-9)


def lr_at(step: int, train_cfg, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based); depends on nothing else. The
    horizon is always ``train.epochs``: ``train.max_steps`` only stops early."""
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
    """Set every parameter group's rate to ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
