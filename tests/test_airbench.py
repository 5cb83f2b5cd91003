"""airbench94's network and the recipe's pieces (configs/airbench94.yaml): the whitening init, the
schedule, the per-group learning rate, Lookahead with its ramp, alternating flip, reflect
translate, fractional epochs; and the reproducibility guarantees with all of them on."""

from __future__ import annotations

import json
import math
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifar_dist.config.loading import load_config
from cifar_dist.data.augment import AugmentSpec, augment, flips, random_crop
from cifar_dist.data.cifar import synthetic_cifar
from cifar_dist.data.loaders import TorchLoader
from cifar_dist.data.sharding import Shard
from cifar_dist.errors import ConfigError
from cifar_dist.model.airbench import AirbenchNet, whitening_weights
from cifar_dist.model.optim import build_optimizer, lr_at, param_groups, schedule_steps, set_lr
from cifar_dist.model.resnet import build_model, count_parameters
from cifar_dist.trainer.averaging import LOOKAHEAD_FILE, Lookahead

from conftest import FAULT_ARG, REPO, SMOKE, base_env, cli, fault_env, summary, torchrun
from helpers import SPE, build, fit, restore

RECIPE = REPO / "configs" / "airbench94.yaml"
# The recipe's pieces on the smoke set-up (synthetic data, batch 64, BatchNorm groups of 16 and
# exact_reduce): what the reproducibility tests train.
PIECES = [
    "model.name=airbench94",
    "model.whiten_bias_epochs=1",
    "model.bn_momentum=0.4",
    "data.crop_padding=2",
    "data.crop_pad_mode=reflect",
    "data.flip=alternating",
    "data.cutout=0",
    "train.norm_lr_scale=64",
    "train.lr=0.2",
    "train.momentum=0.85",
    "train.lr_start_factor=0.2",
    "train.lr_end_factor=0.07",
    "train.lookahead.k=5",
    "train.lookahead.alpha=0.2262190625",
    "train.lookahead.ramp_power=3",
    "train.lookahead.buffers=true",
    "train.lookahead.end_on_slow=true",
    "eval.tta=flip_translate",
]


def test_the_recipe_is_airbenchs_hyperparameters_in_mean_loss_form():
    cfg = load_config(RECIPE, [])
    t = cfg.train
    momentum, per_1024 = 0.85, 1 + 1 / (1 - 0.85)
    # airbench: loss summed over the batch, SGD lr = 11.5 / 1024 / per_1024, decay 0.0153 x 1024 / 1024 / per_1024
    sum_lr, sum_decay = 11.5 / 1024 / per_1024, 0.0153 / per_1024
    assert t.momentum == momentum and t.batch_size == 1024 and t.nesterov
    assert t.lr == pytest.approx(sum_lr * 1024, rel=1e-12)  # the mean loss is the sum / 1024
    assert t.lr * t.weight_decay == pytest.approx(sum_decay, rel=1e-12)  # the same decay per step
    assert schedule_steps(t, 50_000 // 1024) == 476
    assert t.warmup_epochs * 48 == pytest.approx(int(476 * 0.23))
    assert t.lookahead.alpha == pytest.approx(1 - 0.95**5)


def test_the_onecycle_factors_give_airbenchs_schedule_at_every_step():
    t = load_config(RECIPE, []).train
    total, warm = 476, int(476 * 0.23)

    def airbench(step):  # its get_lr, by its description
        if step < warm:
            return 0.2 * (1 - step / warm) + step / warm
        frac = (step - warm) / (total - warm)
        return (1 - frac) + 0.07 * frac

    assert [lr_at(s, t, 48) / t.lr for s in range(total)] == pytest.approx([airbench(s) for s in range(total)])


def test_the_network_has_the_documented_parameters_and_layers():
    cfg = load_config(RECIPE, [])
    model = build_model(cfg.model)
    assert count_parameters(model) == 1_971_352  # trained
    assert sum(p.numel() for p in model.parameters()) == 1_971_352 + 288 + 1_152  # frozen whitening and BN scales
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 6 and all(m.eps == 1e-12 and not m.weight.requires_grad for m in bns)
    assert all(m.momentum == 0.4 for m in bns)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # identity init: each conv's first output channels copy their input channels
    conv = model.group2.conv2.weight
    assert torch.equal(conv[:, :, 1, 1].diagonal(), torch.ones(256))


def test_cifar_dist_summary_prints_the_networks_table_parameters_and_flops(capsys):
    from cifar_dist.cli.main import main

    assert main(["summary", "--config", str(RECIPE)]) == 0
    out = capsys.readouterr().out
    assert "1,971,352" in out and "Conv2d" in out and "GELU" in out
    assert "GFLOP" in out or "MFLOP" in out


def _patches_by_hand(images: np.ndarray) -> np.ndarray:
    rows = []
    for img in images:
        for y in range(img.shape[1] - 1):
            for x in range(img.shape[2] - 1):
                rows.append(img[:, y : y + 2, x : x + 2].reshape(-1))  # (channel, dy, dx)
    return np.array(rows)


def test_the_whitening_init_equals_a_hand_computation_on_a_fixed_batch():
    images = torch.randn(3, 3, 6, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 0.5]).view(
        1, 3, 1, 1
    )
    w = whitening_weights(images)
    assert w.shape == (24, 3, 2, 2)
    p = _patches_by_hand(images.double().numpy())
    cov = p.T @ p / len(p)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    expected = vectors[:, order].T / np.sqrt(values[order] + 5e-4)[:, None]  # rows: scaled eigenvectors
    got = w[:12].reshape(12, 12).double().numpy()
    signs = np.sign((got * expected).sum(1))  # an eigenvector is defined up to its sign
    np.testing.assert_allclose(got, expected * signs[:, None], rtol=1e-9, atol=1e-9)
    assert torch.equal(w[12:], -w[:12])
    # whitened patches: uncorrelated, each of variance eigenvalue / (eigenvalue + eps)
    out = p @ got.T
    np.testing.assert_allclose(out.T @ out / len(p), np.diag(values[order] / (values[order] + 5e-4)), atol=1e-9)


def test_a_run_starts_from_the_whitening_of_its_first_training_images(tmp_path):
    trainer = build(tmp_path / "run", *PIECES)
    images = trainer.loader._loader.dataset.data.images[:5000]
    from cifar_dist.data import normalize

    expected = whitening_weights(normalize(images, trainer.cfg.data.mean, trainer.cfg.data.std, channels_last=False))
    assert torch.equal(trainer.model.whiten.weight.detach(), expected.float())


def test_the_whitening_bias_trains_in_its_epochs_only_and_the_batchnorm_biases_at_64x():
    cfg = load_config(SMOKE, [*PIECES, "train.weight_decay=0.01"])
    model = AirbenchNet(10, torch.nn.BatchNorm2d, whiten_bias_epochs=1)
    opt = build_optimizer(param_groups(model, cfg.train), cfg.train)
    set_lr(opt, 0.1)
    scaled = [g for g in opt.param_groups if g.get("lr_scale")]
    assert len(scaled) == 1 and scaled[0]["lr"] == pytest.approx(6.4)
    assert scaled[0]["weight_decay"] == pytest.approx(0.01 / 64)
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in scaled[0]["params"]} == bn_biases | {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
    }
    from cifar_dist.trainer.build import frozen_parameters

    assert frozen_parameters(model, 0) == [] and frozen_parameters(model, 1) == [model.whiten.bias]
    assert frozen_parameters(torch.nn.Linear(2, 2), 5) == []


def test_a_frozen_whitening_bias_does_not_move_in_training(tmp_path):
    seen = []

    class Watch:
        def on_train_start(self, run):
            self.model = run.model

        def on_epoch_end(self, row):
            seen.append(self.model.whiten.bias.detach().clone())

    # without Lookahead, whose slow weights would pull it (as in airbench, where it averages them too)
    pieces = [p for p in PIECES if not p.startswith("train.lookahead")]
    trainer = build(tmp_path / "run", *pieces, "train.epochs=2", callbacks=[Watch()])
    start = trainer.model.whiten.bias.detach().clone()
    fit(trainer)
    assert not torch.equal(seen[0], start)  # trained in epoch 1
    assert torch.equal(seen[1], seen[0])  # frozen after it: no step, no momentum, no decay


def test_lookahead_ramps_its_fraction_averages_buffers_and_ends_on_the_slow_weights():
    cfg = load_config(SMOKE, PIECES).train.lookahead
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    la = Lookahead(cfg, model, schedule_steps=476, last_step=12)
    assert [la.alpha_at(s) for s in (0, 5, 238, 476)] == pytest.approx(
        [1 - 0.95**5 * (s / 476) ** 3 for s in (0, 5, 238, 476)]
    )
    assert "1.running_mean" in la.names and "1.num_batches_tracked" not in la.names
    slow = [t.clone() for t in la.slow]
    for step in range(1, 13):
        with torch.no_grad():
            for t in la.fast:
                t.add_(1.0)
        la.after_step(step)
        if step % 5 == 0:
            a = la.alpha_at(step)
            slow = [s + a * (f - s) for s, f in zip(slow, [s + 5.0 for s in slow])]
    # after step 12 (not an update step: the last is 10) the model holds the slow weights of step 10
    assert all(torch.allclose(s, t) for s, t in zip(slow, la.slow))
    assert all(torch.equal(f, s) for f, s in zip(la.fast, la.slow))


def test_alternating_flip_flips_each_sample_in_exactly_one_of_two_consecutive_epochs():
    index = torch.arange(10_000)
    per_epoch = [flips(index, e, 7, "alternating") for e in range(4)]
    for a, b in zip(per_epoch, per_epoch[1:]):
        assert torch.equal(a ^ b, torch.ones_like(a))
    assert 4_800 < int(per_epoch[0].sum()) < 5_200  # the first epoch's choice is a coin per sample
    assert not torch.equal(per_epoch[0], flips(index, 0, 8, "alternating"))  # ... keyed by the seed
    random = [flips(index, e, 7, "random") for e in range(2)]
    assert 4_800 < int((random[0] ^ random[1]).sum()) < 5_200


def test_reflect_translate_is_a_crop_of_the_reflect_padded_image():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    index = torch.arange(64) * 13
    out = random_crop(x, index, 3, 5, 2, reflect=True)
    padded = F.pad(x.float(), (2, 2, 2, 2), mode="reflect")
    from cifar_dist.data.augment import CROP_X, CROP_Y, rand_int

    dy, dx = rand_int(5, 3, index, CROP_Y, 5), rand_int(5, 3, index, CROP_X, 5)
    for i in range(64):
        y, xx = int(dy[i]), int(dx[i])
        assert torch.equal(out[i].float(), padded[i, :, y : y + 32, xx : xx + 32])
    assert {int(v) for v in dy} == set(range(5))  # shifts of -2..2


def _epoch_pixels(loader, epoch) -> dict[int, torch.Tensor]:
    out = {}
    for micro in loader.iter_epoch(epoch):
        for x, _y, idx in micro:
            out.update({int(i): img for i, img in zip(idx, x)})
    return out


def test_the_pieces_deliver_the_same_pixels_for_1_and_2_processes():
    data = synthetic_cifar(256, 1)
    cfg = load_config(SMOKE, PIECES)
    spec = AugmentSpec.from_config(cfg.data)
    assert spec.flip == "alternating" and spec.crop_pad_mode == "reflect"
    for epoch in (0, 1):
        one = _epoch_pixels(TorchLoader(data, spec, 0, Shard(0, 1, 64), "cpu", workers=0), epoch)
        two = {}
        for rank in (0, 1):
            two.update(_epoch_pixels(TorchLoader(data, spec, 0, Shard(rank, 2, 64), "cpu", workers=0), epoch))
        assert one.keys() == two.keys() and all(torch.equal(one[i], two[i]) for i in one)
        # and what augment gives each sample on its own
        i = next(iter(one))
        assert torch.equal(one[i], augment(data.images[i : i + 1], torch.tensor([i]), epoch, 0, spec)[0])


def test_fractional_epochs_stop_inside_the_last_epoch_and_schedule_over_it(tmp_path):
    trainer = build(tmp_path / "run", "train.epochs=1.5", "checkpoint.every_steps=2", "checkpoint.keep=10")
    state = fit(trainer)
    assert state.global_step == math.ceil(1.5 * SPE) == 12
    assert [r["epoch"] for r in state.history] == [1, 2] and state.epoch == 1 and state.step_in_epoch == 4
    # the schedule ends at step 12, not 16: warm-up to step 4, then 8 steps down, the last at 1/8
    assert lr_at(11, trainer.cfg.train, SPE) == pytest.approx(trainer.cfg.train.lr / 8)
    # a resume from inside the last epoch ends at the same step with the same weights
    resumed = build(tmp_path / "copy", "train.epochs=1.5")
    shutil.copytree(trainer.run_dir / "checkpoints" / "step_00000010", tmp_path / "copy" / "ckpt")
    again = fit(resumed, restore(resumed, tmp_path / "copy" / "ckpt"))
    assert again.global_step == 12
    assert all(
        torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(), resumed.model.state_dict().values())
    )


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.flip=sideways", "data.flip"),
        ("data.crop_pad_mode=wrap", "data.crop_pad_mode"),
        ("train.epochs=0", "train.epochs"),
        ("train.norm_lr_scale=0", "train.norm_lr_scale"),
        ("train.lr_end_factor=2", "train.lr_end_factor"),
        ("train.lookahead.ramp_power=-1", "train.lookahead.ramp_power"),
        ("model.whiten_bias_epochs=-1", "model.whiten_bias_epochs"),
    ],
)
def test_bad_values_of_the_new_keys_are_one_line_naming_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        load_config(RECIPE, [override])
    assert "\n" not in str(err.value)


def test_old_spellings_of_flip_still_read():
    assert load_config(SMOKE, ["data.flip=true"]).data.flip == "random"
    assert load_config(SMOKE, ["data.flip=false"]).data.flip == "none"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_pieces_train_the_same_bits_on_1_and_2_processes(tmp_path):
    args = ["--config", SMOKE, *PIECES, "train.epochs=1.5", "data.synthetic_train=1024"]
    cli("train", "--out", tmp_path / "p1", *args)
    torchrun(2, "--out", tmp_path / "p2", *args)
    for name in ("model.safetensors", f"checkpoints/step_00000024/{LOOKAHEAD_FILE}"):
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes(), name
    assert summary(tmp_path / "p2")["test_acc"] == summary(tmp_path / "p1")["test_acc"]
    assert summary(tmp_path / "p1")["steps"] == 24


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_then_resume_with_the_pieces_is_byte_identical(tmp_path):
    """Checkpoints every 4 steps of a 1.5-epoch run (16 steps an epoch, 24 in all); SIGKILL before
    step 19 (in the fractional last epoch); --resume from 16 ends as the uninterrupted run: the
    weights (whitening included), the slow weights and buffers, every evaluation."""
    args = ["--config", SMOKE, *PIECES, "train.epochs=1.5", "data.synthetic_train=1024"]
    args += ["checkpoint.every_steps=4", "checkpoint.keep=10", FAULT_ARG]
    cli("train", "--out", tmp_path / "reference", *args, env=fault_env(""))
    out = tmp_path / "run"
    res = cli("train", "--out", out, *args, env=fault_env("kill@19"), check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    res = cli("train", "--out", out, "--resume", *args, env=fault_env(""))
    assert "step 16)" in res.stdout, res.stdout
    final = "checkpoints/step_00000024"
    for name in ("model.safetensors", f"{final}/model.safetensors", f"{final}/{LOOKAHEAD_FILE}"):
        assert (tmp_path / "reference" / name).read_bytes() == (out / name).read_bytes(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["test_acc"]) for r in rows] == [
        (r["epoch"], r["step"], r["test_acc"]) for r in ref
    ]
    assert summary(out)["test_acc"] == summary(tmp_path / "reference")["test_acc"]


@pytest.mark.slow
def test_airbench94_under_deepspeed_is_refused_in_one_line(tmp_path):
    args = ["--config", SMOKE, "--out", tmp_path / "ds", *PIECES, "train.lookahead=null", "train.exact_reduce=false"]
    res = cli("train", *args, env=base_env(ACCELERATE_USE_DEEPSPEED="true"), check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "cifar-dist: model.name: airbench94 stops training some parameters after a few epochs, which "
        "DeepSpeed's engine cannot do; train it without DeepSpeed"
    )
