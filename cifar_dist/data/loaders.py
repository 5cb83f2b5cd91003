"""Training loaders (torch DataLoader, device-resident) and the evaluation batches. Samples and
augmentation follow from (seed, epoch, global index) alone, so the loaders are interchangeable
and a resumed epoch continues at the exact next sample."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cifar_dist.data.augment import AugmentSpec, augment, device_constant, epoch_order
from cifar_dist.data.cifar import ImageSet
from cifar_dist.data.sharding import Shard, eval_range


class _StepKeys(Sampler):
    """Yields (epoch, indices) for each micro-batch of this rank, from ``start_step`` on."""

    def __init__(self, n: int, seed: int, epoch: int, shard: Shard, start_step: int):
        self.n, self.seed, self.epoch, self.shard, self.start = n, seed, epoch, shard, start_step

    def __len__(self):
        return (self.shard.steps_per_epoch(self.n) - self.start) * self.shard.accum

    def __iter__(self):
        order = epoch_order(self.seed, self.epoch, self.n)
        for step in range(self.start, self.shard.steps_per_epoch(self.n)):
            for pos in self.shard.step_positions(step):
                yield self.epoch, order[pos]


class _AugmentedBatches(Dataset):
    """Builds a whole augmented micro-batch per fetch (in a worker when workers > 0)."""

    def __init__(self, data: ImageSet, spec: AugmentSpec, seed: int):
        self.data, self.spec, self.seed = data, spec, seed

    def __len__(self):
        return len(self.data)

    def __getitems__(self, key):
        epoch, idx = key
        x = augment(self.data.images[idx], idx, epoch, self.seed, self.spec)
        return x, self.data.labels[idx], idx


def _whole_batch(batch):
    return batch


def _worker_init(_):
    torch.set_num_threads(1)  # workers share the cores with training


class Loader(Protocol):
    """An input pipeline: each step's micro-batches ``(uint8 images, labels, sample indices)``."""

    steps_per_epoch: int

    def iter_epoch(
        self, epoch: int, start_step: int = 0
    ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]: ...


class TorchLoader:
    """torch DataLoader over host memory, augmenting in its workers; one DataLoader serves
    every epoch so the workers persist (its sampler is told each epoch and first step)."""

    name = "torch"

    @classmethod
    def from_config(cls, cfg, data: ImageSet, shard: Shard, device) -> TorchLoader:
        return cls(data, AugmentSpec.from_config(cfg.data), cfg.run.seed, shard, device, cfg.data.workers)

    def __init__(self, data: ImageSet, spec: AugmentSpec, seed: int, shard: Shard, device, workers: int = 2):
        self.shard, self.device = shard, torch.device(device)
        self.steps_per_epoch = shard.steps_per_epoch(len(data))
        self._keys = _StepKeys(len(data), seed, 0, shard, 0)
        self._loader = DataLoader(
            _AugmentedBatches(data, spec, seed),
            batch_sampler=self._keys,
            collate_fn=_whole_batch,
            num_workers=workers,
            worker_init_fn=_worker_init,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )

    def iter_epoch(self, epoch: int, start_step: int = 0):
        self._keys.epoch, self._keys.start = epoch, start_step  # read in this process by the iterator
        micro_batches = []
        for x, y, idx in self._loader:
            micro_batches.append((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx))
            if len(micro_batches) == self.shard.accum:
                yield micro_batches
                micro_batches = []


class GpuLoader:
    """The whole training set resident on the device as uint8; gather and augment there."""

    name = "gpu"

    @classmethod
    def from_config(cls, cfg, data: ImageSet, shard: Shard, device) -> GpuLoader:
        return cls(data, AugmentSpec.from_config(cfg.data), cfg.run.seed, shard, device)

    def __init__(self, data: ImageSet, spec: AugmentSpec, seed: int, shard: Shard, device):
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.n, self.spec, self.seed, self.shard = len(data), spec, seed, shard
        self.steps_per_epoch = shard.steps_per_epoch(self.n)

    def iter_epoch(self, epoch: int, start_step: int = 0):
        order = epoch_order(self.seed, epoch, self.n).to(self.device)
        for step in range(start_step, self.steps_per_epoch):
            micro_batches = []
            for pos in self.shard.step_positions(step):
                idx = order[pos]
                x = augment(self.images[idx], idx, epoch, self.seed, self.spec)
                micro_batches.append((x, self.labels[idx], idx))
            yield micro_batches


def eval_batches(data: ImageSet, rank: int, world: int, batch: int, device):
    """This rank's share of ``data`` as (x uint8, y, valid rows); the last batch is padded to
    ``batch`` so a compiled model sees one shape."""
    start, stop = eval_range(len(data), rank, world)
    for s in range(start, stop, batch):
        e = min(s + batch, stop)
        x, y = data.images[s:e], data.labels[s:e]
        valid = e - s
        if valid < batch:
            pad = batch - valid
            x = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))])
            y = torch.cat([y, y.new_zeros(pad)])
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), valid


@functools.lru_cache(maxsize=16)
def _pixel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std in pixel units, [1,3,1,1] on ``device``, copied there once."""
    m = device_constant(mean, torch.float32, device).view(1, 3, 1, 1) * 255
    s = device_constant(std, torch.float32, device).view(1, 3, 1, 1) * 255
    return m, s


def normalize(x: torch.Tensor, mean, std, channels_last: bool) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 normalized, in the model's memory format."""
    m, s = _pixel_stats(tuple(mean), tuple(std), x.device)
    x = (x.float() - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
