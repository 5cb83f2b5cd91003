"""data.loader=ffcv: FFCV reads and decodes in our sample order; our augmentation runs after
(FFCV's own random operations are not reproducible even with a seed). The stored index of
each sample proves the order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cifar_dist.config.loading import resolve_data_root
from cifar_dist.data.augment import AugmentSpec, augment, epoch_order
from cifar_dist.data.beton import ensure_beton, require_ffcv
from cifar_dist.data.cifar import ImageSet
from cifar_dist.data.sharding import Shard
from cifar_dist.errors import DataError


def _order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class GlobalOrder(TraversalOrder):
        """This rank's samples of an epoch in the global order; binds itself when FFCV calls
        it with the loader (FFCV 1.0.2 takes a custom order only as such an instance)."""

        def __init__(self, n: int, seed: int, shard: Shard):
            self.n, self.order_seed, self.shard = n, seed, shard
            self.start_step = 0

        def __call__(self, loader):
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int):
            order = self.shard.rank_order(epoch_order(self.order_seed, epoch, self.n))
            return order[self.start_step * self.shard.per_process :].numpy().astype(np.uint64)

    return GlobalOrder


class FfcvLoader:
    name = "ffcv"

    @classmethod
    def from_config(cls, cfg, data: ImageSet, shard: Shard, device) -> FfcvLoader:
        return cls(cfg, data, AugmentSpec.from_config(cfg.data), shard, device)

    def __init__(self, cfg, data: ImageSet, spec: AugmentSpec, shard: Shard, device):
        self._threads = torch.get_num_threads()
        require_ffcv()
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import Squeeze, ToDevice, ToTensor

        folder = Path(cfg.data.beton_dir) if cfg.data.beton_dir else resolve_data_root(cfg) / "beton"
        name = "synthetic-train" if cfg.data.synthetic else "train"
        if cfg.data.subset or cfg.data.val_split:
            name += f"-{len(data)}"
        path, _ = ensure_beton(data, folder, name, max(cfg.data.workers, 1))
        self.device, self.spec, self.seed, self.shard = torch.device(device), spec, cfg.run.seed, shard
        self.n = len(data)
        self.steps_per_epoch = shard.steps_per_epoch(self.n)
        self._order = _order_class()(self.n, self.seed, shard)
        # On a GPU, FFCV copies images and labels to it from its own pinned buffers, on its
        # own thread; the indices stay on the host, where they prove the order.
        to_gpu = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        self._loader = Loader(
            str(path),
            batch_size=shard.micro_batch,
            num_workers=max(cfg.data.workers, 1),
            order=self._order,
            drop_last=False,
            os_cache=True,
            pipelines={
                "image": [SimpleRGBImageDecoder(), ToTensor(), *to_gpu],
                "label": [IntDecoder(), ToTensor(), Squeeze(), *to_gpu],
                "index": [IntDecoder(), ToTensor(), Squeeze()],
            },
        )
        # FFCV's Loader resets torch's threads in __init__ and every __iter__ (docs/data.md).
        torch.set_num_threads(self._threads)
        if self._loader.reader.num_samples != self.n:
            raise DataError(f"{path}: holds {self._loader.reader.num_samples} samples, expected {self.n}")

    def iter_epoch(self, epoch: int, start_step: int = 0):
        self._order.start_step = start_step
        self._loader.next_epoch = epoch
        expected = self._order.sample_order(epoch)
        micro_batches, pos = [], 0
        batches = iter(self._loader)
        torch.set_num_threads(self._threads)
        for images, labels, index in batches:
            # FFCV recycles its output buffers: everything kept is copied.
            b = len(labels)
            expected_index = torch.from_numpy(expected[pos : pos + b].astype(np.int64))
            pos += b
            index = index.to(torch.int64, copy=True)
            if not torch.equal(index, expected_index):  # the stored index proves the order
                raise DataError("ffcv loader: samples arrived out of order")
            x = images.permute(0, 3, 1, 2).contiguous().to(self.device, non_blocking=True)
            x = augment(x, index, epoch, self.seed, self.spec)
            y = labels.to(torch.int64, copy=True).to(self.device, non_blocking=True)
            micro_batches.append((x, y, index))
            if len(micro_batches) == self.shard.accum:
                yield micro_batches
                micro_batches = []
