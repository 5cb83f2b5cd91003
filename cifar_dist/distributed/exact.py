"""Exact gradient reduction (``train.exact_reduce``): bitwise the same weights for any
power-of-two process count. Each ``model.bn_group`` chunk's gradient is summed in one balanced
binary tree over the global chunk order, then divided by the power-of-two chunk count, which is
exact (docs/distributed.md)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class TreeSum:
    """Sums a stream of tensor lists as a balanced binary tree over the stream order."""

    def __init__(self):
        self._stack: list[tuple[int, list[torch.Tensor]]] = []
        self.count = 0

    def add(self, item: list[torch.Tensor]) -> None:
        level = 0
        self.count += 1
        while self._stack and self._stack[-1][0] == level:
            _, left = self._stack.pop()
            item = [a.add_(b) for a, b in zip(left, item)]  # left + right, left in place
            level += 1
        self._stack.append((level, item))

    def result(self) -> list[torch.Tensor]:
        if len(self._stack) != 1:
            raise ValueError(f"tree sum of {self.count} items: the count must be a power of two")
        return self._stack[0][1]


def take_grads(params) -> list[torch.Tensor]:
    """Detach the current gradients (zeros where a parameter got none) and clear them."""
    out = []
    for p in params:
        out.append(p.grad if p.grad is not None else torch.zeros_like(p))
        p.grad = None
    return out


def tree_all_reduce(flat: torch.Tensor) -> torch.Tensor:
    """Sum a 1-D tensor over processes, in place, as a tree in rank order (same bits on every rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        tree = TreeSum()
        for part in parts:
            tree.add([part])
        flat.copy_(tree.result()[0])
    return flat


def reduce_across_processes(local: list[torch.Tensor], num_chunks: int) -> list[torch.Tensor]:
    """Tree-sum every process's partial sum in rank order, then divide by ``num_chunks``."""
    flat = tree_all_reduce(torch.cat([g.reshape(-1) for g in local])) / num_chunks
    return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in local]), local)]
