"""The per-layer table of the paper's Figure 1, and FLOPs counted from the model."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def _display_name(module: nn.Module) -> str:
    """The torch.nn class a module is (GroupBatchNorm2d shows as BatchNorm2d)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn"):
            if cls is nn.Module:
                break
            return cls.__name__
    return type(module).__name__


def layer_table(model: nn.Module, image_size: int = 32) -> list[tuple[str, list[int], int]]:
    """(layer, output shape, own parameters) in forward-completion order, like torchsummary;
    containers and the model itself get no row."""
    rows: list[tuple[str, list[int], int]] = []

    def hook(module, inputs, output):
        shape = [-1] + list(output.shape[1:])
        own = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append((f"{_display_name(module)}-{len(rows) + 1}", shape, own))

    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    hooks = [m.register_forward_hook(hook) for m in model.modules() if m is not model and not isinstance(m, containers)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


def count_flops(model: nn.Module, batch: int = 2, train: bool = False, image_size: int = 32) -> float:
    """FLOPs per image (1 MAC = 2 FLOPs) of a forward pass, or of forward + backward."""
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    was_training = model.training
    model.eval()  # batch statistics cost no counted FLOPs; eval mode works for any batch size
    counter = FlopCounterMode(display=False)
    try:
        with counter, contextlib.nullcontext() if train else torch.no_grad():
            out = model(x)
            if train:
                out.float().sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return counter.get_total_flops() / batch


def format_table(rows) -> str:
    lines = [f"{'Layer (type)':>25}  {'Output Shape':>25}  {'Param #':>12}", "=" * 66]
    for name, shape, params in rows:
        lines.append(f"{name:>25}  {str(shape):>25}  {params:>12,}")
    return "\n".join(lines)
