"""Helpers the tests share: fake CIFAR-10 batches, a pickle that would run code, and the smoke
run built and trained in the test process (tests import them from here, never from each other)."""

from __future__ import annotations

import os
import pickle

import numpy as np

from cifar_dist.config.loading import load_config
from cifar_dist.data.cifar import FOLDER
from cifar_dist.distributed.accelerator import make_accelerator
from cifar_dist.storage.state import TrainState
from cifar_dist.trainer.build import build_data, resolve_run_precision
from cifar_dist.trainer.callbacks import Callbacks
from cifar_dist.trainer.trainer import Trainer

from conftest import REPO


def write_batch(path, n=20, **extra):
    rng = np.random.default_rng(0)
    d = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": list(rng.integers(0, 10, n).tolist()),
        b"batch_label": b"x",
    }
    d.update(extra)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)
    return d


def fake_cifar(root, n=20):
    folder = root / FOLDER
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_batch(folder / name, n)
    return root


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


SMOKE = REPO / "configs" / "smoke.yaml"
# 512 images in batches of 64: 8 steps per epoch, 16 in the 2 epochs of the smoke recipe.
SMALL = ["data.synthetic_train=512", "data.synthetic_test=256", "run.progress=false", "run.plots=false"]
SPE = 8
# A bench of the smoke model timed as briefly as it runs: one warm-up step, one repeat of two.
TINY_BENCH = ["--warmup", "1", "--steps", "2", "--repeats", "1", "model.widths=[8]", "model.blocks=[1]"]


def build(run_dir, *overrides, callbacks=()):
    """The Trainer of `cifar-dist train` for the smoke recipe, built in this process."""
    cfg = load_config(SMOKE, [*SMALL, *overrides])
    resolve_run_precision(cfg)
    cfg.run.out_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg)
    shard, train_set, eval_set, _ = build_data(cfg, accelerator)
    return Trainer(cfg, accelerator, shard, train_set, eval_set, run_dir, callbacks=Callbacks(callbacks))


def restore(trainer, ckpt):
    """Load checkpoint ``ckpt`` into ``trainer``; returns the TrainState it holds."""
    return trainer.restore(ckpt)


def fit(trainer, state=None):
    """Train ``trainer`` from ``state`` (a fresh state when None) to its end."""
    state = TrainState() if state is None else state
    if state is not trainer.state:
        trainer.start_from(state)
    return trainer.fit()
