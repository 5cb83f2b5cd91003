"""CIFAR files (safe reader), the shared augmentation, sharding and the loaders."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cifar_dist.config.loading import load_config
from cifar_dist.data import Shard, build_datasets
from cifar_dist.data.augment import AugmentSpec, augment, epoch_order, hash_u32, rand_int
from cifar_dist.data.cifar import FOLDER, load_cifar10, read_batch, synthetic_cifar
from cifar_dist.data.loaders import GpuLoader, TorchLoader, eval_batches
from cifar_dist.data.sharding import eval_range
from cifar_dist.errors import ConfigError, DataError

from helpers import _Payload, fake_cifar, write_batch


def test_reader_returns_images_and_labels(tmp_path):
    d = write_batch(tmp_path / "b", 7)
    images, labels = read_batch(tmp_path / "b")
    assert images.shape == (7, 3, 32, 32) and images.dtype == np.uint8
    assert np.array_equal(images.reshape(7, -1), d[b"data"]) and labels.tolist() == d[b"labels"]


def test_pickle_code_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / FOLDER
    fake_cifar(tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Payload(marker), b"labels": [1]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_3: not a CIFAR batch \(refused to load global posix.system"):
        load_cifar10(tmp_path, train=True, verify=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("truncate", "truncated or corrupt CIFAR batch"),
        ("labels", "labels outside 0..9"),
        ("shape", "'data' must be uint8 N x 3072"),
        ("empty", "truncated or corrupt CIFAR batch"),
    ],
)
def test_damaged_batch_files_are_refused(tmp_path, damage, fragment):
    path = tmp_path / "b"
    write_batch(path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "labels":
        write_batch(path, labels=[11] * 20)
    elif damage == "shape":
        write_batch(path, data=np.zeros((20, 100), np.uint8))
    else:
        path.write_bytes(b"")
    with pytest.raises(DataError, match=fragment):
        read_batch(path)


def test_missing_files_say_where_to_put_what(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR-10 not found; run `cifar-dist prepare"):
        load_cifar10(tmp_path, train=False)


def test_md5_mismatch_warns_but_loads(tmp_path):
    fake_cifar(tmp_path)
    with pytest.warns(UserWarning, match="differ from the official CIFAR-10 checksums"):
        data = load_cifar10(tmp_path, train=False)
    assert len(data) == 20


def test_subset_and_val_split(tmp_path):
    fake_cifar(tmp_path, n=40)
    cfg = load_config(None, [f"data.root={tmp_path}", "data.val_split=50", "data.subset=100", "train.batch_size=10"])
    with pytest.warns(UserWarning):
        train, held_out, name = build_datasets(cfg)
    assert (len(train), len(held_out), name) == (100, 50, "val")
    with pytest.raises(ConfigError, match="data.subset"):
        build_datasets(load_config(None, ["data.synthetic=true", "data.subset=999999"]))


def test_synthetic_data_is_fixed_and_class_dependent():
    a, b = synthetic_cifar(256, 1), synthetic_cifar(256, 1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    means = torch.stack([a.images[a.labels == k].float().mean(0) for k in range(3)])
    assert (means[0] - means[1]).abs().mean() > 5  # classes look different


# --- the shared augmentation ------------------------------------------------------------


def test_hash_is_a_pure_function_of_its_key():
    idx = torch.arange(1000)
    h = hash_u32(7, 3, idx, 0)
    assert torch.equal(h, hash_u32(7, 3, idx, 0))
    assert torch.equal(h[500:], hash_u32(7, 3, idx[500:], 0))
    assert not torch.equal(h, hash_u32(7, 4, idx, 0)) and not torch.equal(h, hash_u32(8, 3, idx, 0))
    assert int(h.min()) >= 0 and int(h.max()) < 2**32
    flips = rand_int(7, 3, torch.arange(20000), 2, 2).float().mean()
    assert abs(float(flips) - 0.5) < 0.02


def test_each_sample_depends_only_on_its_own_index():
    data = synthetic_cifar(64, 0)
    spec = AugmentSpec(crop_padding=4, flip=True, cutout=8, color_jitter=0.1, rotation=10)
    idx = torch.arange(64)
    whole = augment(data.images, idx, 2, 5, spec)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    shuffled = augment(data.images[perm], idx[perm], 2, 5, spec)
    assert torch.equal(whole[perm], shuffled)
    assert torch.equal(whole[10:20], augment(data.images[10:20], idx[10:20], 2, 5, spec))
    assert not torch.equal(whole, augment(data.images, idx, 3, 5, spec))  # a new epoch, new draws


def test_crop_flip_cutout_match_a_per_sample_reference():
    data = synthetic_cifar(16, 0)
    idx = torch.arange(100, 116)
    out = augment(data.images, idx, 1, 9, AugmentSpec(crop_padding=4, flip=True, cutout=6, fill=(1, 2, 3)))
    for i in range(16):
        key = idx[i : i + 1]
        dy, dx = int(rand_int(9, 1, key, 0, 9)), int(rand_int(9, 1, key, 1, 9))
        ref = torch.nn.functional.pad(data.images[i], (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
        if int(rand_int(9, 1, key, 2, 2)):
            ref = ref.flip(2)
        cy, cx = int(rand_int(9, 1, key, 3, 32)), int(rand_int(9, 1, key, 4, 32))
        y0, x0 = max(cy - 3, 0), max(cx - 3, 0)
        ref = ref.clone()
        ref[:, y0 : cy + 3, x0 : cx + 3] = torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)
        assert torch.equal(out[i], ref), i


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(1, 0, 1000)
    assert torch.equal(a, epoch_order(1, 0, 1000)) and sorted(a.tolist()) == list(range(1000))
    assert not torch.equal(a, epoch_order(1, 1, 1000)) and not torch.equal(a, epoch_order(2, 0, 1000))


# --- sharding and loaders ---------------------------------------------------------------


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (4, 2), (8, 1)])
def test_ranks_together_see_exactly_the_global_batch(world, accum):
    order = torch.randperm(1000)
    one = Shard(0, 1, 64).rank_order(order)
    parts = [Shard(r, world, 64, accum) for r in range(world)]
    steps = parts[0].steps_per_epoch(1000)
    assert steps == 15 and len(one) == 15 * 64
    for s in range(steps):
        merged = torch.cat([order[p] for sh in parts for p in sh.step_positions(s)])
        assert torch.equal(merged, one[s * 64 : (s + 1) * 64])


def test_indivisible_global_batch_is_refused():
    with pytest.raises(ConfigError, match=r"train.batch_size: 64 is not divisible by 3 processes"):
        Shard(0, 3, 64)


@pytest.mark.parametrize("n, world", [(10000, 3), (1024, 4), (7, 8)])
def test_evaluation_counts_every_sample_once(n, world):
    seen = []
    for r in range(world):
        start, stop = eval_range(n, r, world)
        seen += list(range(start, stop))
    assert seen == list(range(n))
    data = synthetic_cifar(n, 0)
    counted = sum(valid for r in range(world) for _, _, valid in eval_batches(data, r, world, 100, "cpu"))
    assert counted == n


def test_torch_and_device_loaders_deliver_identical_batches():
    data = synthetic_cifar(512, 0)
    spec = AugmentSpec(crop_padding=4, flip=True, cutout=8)
    for world in (1, 2):
        for rank in range(world):
            shard = Shard(rank, world, 128)
            a = list(TorchLoader(data, spec, 3, shard, "cpu", workers=2).iter_epoch(1, start_step=1))
            b = list(GpuLoader(data, spec, 3, shard, "cpu").iter_epoch(1, start_step=1))
            assert len(a) == len(b) == 3
            for (xa, ya, ia), (xb, yb, ib) in zip((m for s in a for m in s), (m for s in b for m in s)):
                assert torch.equal(ia, ib) and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_torch_loader_keeps_its_workers_across_epochs():
    """One DataLoader with persistent workers serves every epoch (and a pass cut short, as
    at train.max_steps); its batches equal the in-process loader's."""
    data = synthetic_cifar(256, 0)
    spec = AugmentSpec(crop_padding=4, flip=True, cutout=8)
    shard = Shard(0, 1, 64)
    pooled, inline = TorchLoader(data, spec, 3, shard, "cpu", workers=1), TorchLoader(data, spec, 3, shard, "cpu", 0)
    workers = set()
    for epoch, start, steps in ((0, 0, 4), (1, 2, 1), (2, 0, 4)):
        got = [m for _, s in zip(range(steps), pooled.iter_epoch(epoch, start)) for m in s]
        want = [m for _, s in zip(range(steps), inline.iter_epoch(epoch, start)) for m in s]
        assert len(got) == len(want) == min(steps, 4 - start)
        for (xa, ya, ia), (xb, yb, ib) in zip(got, want):
            assert torch.equal(ia, ib) and torch.equal(xa, xb) and torch.equal(ya, yb)
        workers.add(tuple(w.pid for w in pooled._loader._iterator._workers))
    assert len(workers) == 1
