"""The FFCV loader: the same pixels as the torch and gpu loaders, verified .beton files,
and the same training run whichever loader feeds it."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO, cli, load_weights, max_diff

ffcv = pytest.importorskip("ffcv", reason="FFCV is not installed (pip install -e '.[ffcv]')")

from cifar_dist.config.loading import load_config  # noqa: E402
from cifar_dist.data import Shard, build_datasets  # noqa: E402
from cifar_dist.data.augment import AugmentSpec  # noqa: E402
from cifar_dist.data.beton import ensure_beton  # noqa: E402
from cifar_dist.data.ffcv_loader import FfcvLoader  # noqa: E402
from cifar_dist.data.loaders import GpuLoader, TorchLoader  # noqa: E402
from cifar_dist.errors import DataError  # noqa: E402

pytestmark = [pytest.mark.ffcv, pytest.mark.slow]
SMOKE = REPO / "configs" / "smoke.yaml"


def _micro_batches(loader, epoch, start_step):
    return [m for step in loader.iter_epoch(epoch, start_step=start_step) for m in step]


@pytest.mark.parametrize("world", [1, 2])
def test_three_loaders_deliver_identical_pixels_on_real_cifar10(cifar_root, tmp_path, world):
    """Real images (the first 2,048 of the training set), every augmentation the loaders
    share, each rank of 1 and 2 processes, epoch 2 from step 1 (as after a resume)."""
    cfg = load_config(
        SMOKE,
        [
            f"data.root={cifar_root}",
            "data.synthetic=false",
            "data.subset=2048",
            f"data.beton_dir={tmp_path / 'beton'}",
            "data.workers=1",
        ],
    )
    train, _, _ = build_datasets(cfg)
    spec = AugmentSpec.from_config(cfg.data)
    # FFCV sets torch's threads to its worker count (at import, in Loader() and in every
    # iter()); FfcvLoader must put them back, or training runs on one core.
    torch.set_num_threads(2)
    for rank in range(world):
        shard = Shard(rank, world, 128)
        loaders = {
            "torch": TorchLoader(train, spec, cfg.run.seed, shard, "cpu", workers=1),
            "gpu": GpuLoader(train, spec, cfg.run.seed, shard, "cpu"),
            "ffcv": FfcvLoader(cfg, train, spec, shard, "cpu"),
        }
        batches = {name: _micro_batches(ld, epoch=2, start_step=1)[:4] for name, ld in loaders.items()}
        assert torch.get_num_threads() == 2
        assert len(batches["torch"]) == 4
        for name in ("gpu", "ffcv"):
            assert len(batches[name]) == 4
            for (xa, ya, ia), (xb, yb, ib) in zip(batches["torch"], batches[name]):
                assert torch.equal(ia, ib), f"{name}: other samples (rank {rank} of {world})"
                assert torch.equal(ya, yb) and torch.equal(xa, xb), f"{name}: other pixels or labels"


def test_beton_is_written_once_and_damage_is_refused(tmp_path):
    cfg = load_config(SMOKE, ["data.synthetic_train=256"])
    train, _, _ = build_datasets(cfg)
    path, written = ensure_beton(train, tmp_path, "train")
    assert written and path.stat().st_size > 256 * 3072
    stamp = path.stat().st_mtime_ns
    assert ensure_beton(train, tmp_path, "train") == (path, False)
    assert path.stat().st_mtime_ns == stamp  # up to date: not rewritten
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="corrupt .beton"):
        ensure_beton(train, tmp_path, "train")
    path.write_bytes(bytes(blob[:1000]))
    with pytest.raises(DataError, match="truncated or damaged"):
        ensure_beton(train, tmp_path, "train")


@pytest.mark.timeout(600)  # four runs
def test_twenty_steps_with_each_loader_give_the_same_weights(tmp_path):
    """The black-box check: the same 20 training steps fed by torch, gpu and ffcv, and
    a second ffcv run with the same seed."""
    args = [
        "--config",
        SMOKE,
        "train.max_steps=20",
        "run.progress=false",
        "run.plots=false",
        f"data.beton_dir={tmp_path / 'beton'}",
        "data.workers=1",
    ]
    for name in ("torch", "gpu", "ffcv", "ffcv-again"):
        cli("train", "--out", tmp_path / name, *args, f"data.loader={name.split('-')[0]}")
    ref = load_weights(tmp_path / "torch")
    for name in ("gpu", "ffcv"):
        diff = max_diff(ref, load_weights(tmp_path / name))
        print(f"20 steps, torch vs {name} loader: max |dw| = {diff:.3g}")
        assert diff <= 1e-6
    assert (tmp_path / "ffcv" / "model.safetensors").read_bytes() == (
        tmp_path / "ffcv-again" / "model.safetensors"
    ).read_bytes()
