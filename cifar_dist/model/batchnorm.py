"""Group BatchNorm: the same groups and running statistics for 1 or 64 processes
(``model.bn_group``, docs/distributed.md)."""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over groups of ``group`` samples (0 = whole batch); records each forward's
    statistics for ``sync_bn_statistics``. Its state dict is a plain BatchNorm2d's."""

    stat_sum: torch.Tensor  # this step's summed (mean, variance) per channel: [2, C]
    stat_count: torch.Tensor  # forwards that added to it
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor
    momentum: float

    def __init__(self, num_features: int, group: int = 0, momentum: float = 0.1):
        super().__init__(num_features, momentum=momentum)
        self.group = group
        self.register_buffer("stat_sum", torch.zeros(2, num_features), persistent=False)
        self.register_buffer("stat_count", torch.zeros(()), persistent=False)

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """weight and bias in fp32 (DeepSpeed's bf16/fp16 engines cast them, not the statistics)."""
        return self.weight.float(), self.bias.float()  # the parameters themselves when fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._affine()
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)
        n = x.shape[0]
        g = self.group or n
        if n % g:
            raise ValueError(f"GroupBatchNorm2d: a batch of {n} is not a whole number of groups of {g}")
        if g == n:
            # Fresh buffers with momentum 1 come back holding the batch mean and
            # unbiased variance: native speed, and nothing shared is mutated.
            mean = torch.zeros(self.num_features, device=x.device, dtype=torch.float32)
            var = torch.ones(self.num_features, device=x.device, dtype=torch.float32)
            y = F.batch_norm(x, mean, var, weight, bias, True, 1.0, self.eps)
        else:
            y, mean, var = self._group_forward(x, n // g, weight, bias)
        with torch.no_grad():
            self.stat_sum.add_(torch.stack([mean, var]).detach())
            self.stat_count.add_(1)
        return y

    def _group_forward(self, x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor):
        """Normalize each of ``groups`` contiguous sample groups by its own statistics; returns
        the output and the groups' mean of means and of unbiased variances."""
        n, c, h, w = x.shape
        g = n // groups
        xf = x.float()
        if xf.is_contiguous(memory_format=torch.channels_last) and not xf.is_contiguous():
            var, mean = torch.var_mean(xf.permute(0, 2, 3, 1).reshape(groups, g * h * w, c), dim=1, correction=0)
        else:
            var, mean = torch.var_mean(xf.reshape(groups, g, c, h * w), dim=(1, 3), correction=0)
        scale = weight * torch.rsqrt(var + self.eps)  # [groups, C]
        shift = bias - mean * scale
        y = xf.view(groups, g, c, h, w) * scale.view(groups, 1, c, 1, 1) + shift.view(groups, 1, c, 1, 1)
        m = g * h * w
        return y.view(n, c, h, w).to(x.dtype), mean.detach().mean(0), (var.detach() * (m / max(m - 1, 1))).mean(0)


class _BNLayout:
    """Where each layer's statistics sit in one step's flat tensor, built once per model and
    device so the update is a fixed handful of operations at any depth."""

    def __init__(self, layers: list[GroupBatchNorm2d], running: list[torch.Tensor], device: torch.device, key: tuple):
        self.layers, self.running, self.device, self.key = layers, running, device, key
        self.sizes = [2 * m.num_features for m in layers]
        self.total = sum(self.sizes)
        # the layer of every statistic, to spread the layers' counts over their statistics
        self.owner = torch.repeat_interleave(torch.arange(len(layers)), torch.tensor(self.sizes)).to(device)
        momenta = [m.momentum for m in layers]
        self.momentum: float | torch.Tensor = momenta[0] if len(set(momenta)) == 1 else torch.tensor(momenta).to(device)


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layout(model: nn.Module) -> _BNLayout | None:
    layers = [m for m in model.modules() if isinstance(m, GroupBatchNorm2d)]
    if not layers:
        return None
    running = [m.running_mean for m in layers] + [m.running_var for m in layers]
    device = layers[0].stat_sum.device
    # the layers and buffers it was built for: held by the layout, so their ids are not reused
    key = tuple(map(id, [*layers, *running]))
    cached = _LAYOUTS.get(model)
    if cached is None or cached.device != device or cached.key != key:
        cached = _LAYOUTS[model] = _BNLayout(layers, running, device, key)
    return cached


@torch.no_grad()
def sync_bn_statistics(model: nn.Module, all_reduce=None, extra: torch.Tensor | None = None):
    """Momentum-update the running statistics with the average over all forwards of all
    processes (``all_reduce``: an in-place sum, None for one process). ``extra`` rides along
    in the same collective and is returned summed, so control flags cost no round trip."""
    layout = _layout(model)
    layers = layout.layers if layout is not None else []
    pieces = [m.stat_sum.view(-1) for m in layers] + [m.stat_count.view(1) for m in layers]
    if extra is not None:
        pieces.append(extra.float().flatten())
    if not pieces:
        return extra
    flat = torch.cat(pieces)
    if all_reduce is not None:
        all_reduce(flat)
    if layout is not None:
        count = flat[layout.total : layout.total + len(layers)]
        # count is 0 only for a layer that saw no forward this step; avoid a host sync
        averages = flat[: layout.total] / count.clamp(min=1)[layout.owner]
        rate = ((count > 0).float() * layout.momentum).unbind()
        stats = [a.view(2, -1) for a in averages.split(layout.sizes)]
        torch._foreach_lerp_(layout.running, [s[0] for s in stats] + [s[1] for s in stats], list(rate) * 2)
        torch._foreach_add_([m.num_batches_tracked for m in layers], list((count > 0).long().unbind()))
        torch._foreach_zero_([m.stat_sum for m in layers] + [m.stat_count for m in layers])
    offset = layout.total + len(layers) if layout is not None else 0
    return flat[offset:] if extra is not None else None
