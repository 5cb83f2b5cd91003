"""Test-time augmentation (eval.tta): the views and their weights against a hand-made average,
the same result for any evaluation batch and process count, the evaluations that use it, and
the modes of `cifar-dist eval --tta`."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from cifar_dist.config.loading import load_config
from cifar_dist.data import build_datasets, eval_batches, normalize
from cifar_dist.data.tta import VIEWS, tta_views
from cifar_dist.inference.evaluate import evaluate_model, tta_logits
from cifar_dist.trainer.evaluation import Evaluator

from conftest import SMOKE, cli, cli_here, summary, torchrun

EVAL = ["data.synthetic_train=64", "data.synthetic_test=1000", "run.progress=false"]


def _tiny(*overrides):
    """A seeded 5x5-conv, BatchNorm (eval mode) and linear model: milliseconds per thousand
    images, and its logits depend on where each pixel is (no global pooling); the smoke config."""
    cfg = load_config(SMOKE, [*EVAL, *overrides])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4, padding=2),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    )
    with torch.no_grad():  # running statistics that are not the identity
        model[1].running_mean.uniform_(-0.5, 0.5), model[1].running_var.uniform_(0.5, 2)
    return cfg, model.to(memory_format=torch.channels_last).eval()


def _by_hand(model, x):
    """airbench's TTA level 2 written out: reflection indices instead of F.pad; 1/4 on the
    image and its mirror, 1/8 on each of the two diagonal one-pixel shifts and their mirrors."""
    n = x.shape[-1]
    down_right = torch.tensor([1, *range(n - 1)])  # row i shows row i-1; row 0 reflects row 1
    up_left = torch.tensor([*range(1, n), n - 2])  # row i shows row i+1; the last reflects n-2

    def shift(idx):
        return x[:, :, idx][:, :, :, idx].contiguous(memory_format=torch.channels_last)

    def f(v):
        return model(v).float()

    def mirror(v):
        return v[:, :, :, torch.arange(n - 1, -1, -1)]

    views = [x, mirror(x), shift(down_right), mirror(shift(down_right)), shift(up_left), mirror(shift(up_left))]
    weights = [1 / 4, 1 / 4, 1 / 8, 1 / 8, 1 / 8, 1 / 8]
    return sum(w * f(v) for w, v in zip(weights, views))


@torch.no_grad()
def test_flip_translate_is_airbench_six_view_weighted_average():
    cfg, model = _tiny()
    _, eval_set, _ = build_datasets(cfg)
    x = normalize(eval_set.images[:16], cfg.data.mean, cfg.data.std, channels_last=True)
    got = tta_logits(model, x, "flip_translate", channels_last=True)
    torch.testing.assert_close(got, _by_hand(model, x), rtol=1e-5, atol=1e-6)
    # the weights sum to 1 and there is one forward pass per view
    for mode, n in VIEWS.items():
        views = list(tta_views(x, mode, channels_last=True))
        assert len(views) == n and sum(w for w, _ in views) == 1.0
        assert all(v.shape == x.shape and v.is_contiguous(memory_format=torch.channels_last) for _, v in views)
    # none is the plain forward pass, flip the mean of the image and its mirror, both bit for bit
    plain, mirrored = model(x).float(), model(x.flip(3)).float()
    assert torch.equal(tta_logits(model, x, "none"), plain)
    assert torch.equal(tta_logits(model, x, "flip"), (plain + mirrored) / 2)
    # a shifted view is the image moved by one pixel: interior pixels are the image's neighbours
    _, _, (_, down_right), _, (_, up_left), _ = tta_views(x, "flip_translate", channels_last=True)
    assert torch.equal(down_right[:, :, 1:, 1:], x[:, :, :-1, :-1])
    assert torch.equal(up_left[:, :, :-1, :-1], x[:, :, 1:, 1:])


@torch.no_grad()
def test_tta_result_does_not_depend_on_the_eval_batch_size():
    """1,000 images in batches of 100 and of 1,000: the same predictions, and logits and loss
    equal up to the summation order of the convolutions."""
    results, logits = {}, {}
    cfg, model = _tiny()
    _, eval_set, _ = build_datasets(cfg)
    for batch in (100, 1000):
        cfg.data.eval_batch_size = batch
        results[batch] = evaluate_model(model, eval_set, cfg, torch.device("cpu"), tta="flip_translate")
        rows = []
        for x, _, valid in eval_batches(eval_set, 0, 1, batch, "cpu"):
            x = normalize(x, cfg.data.mean, cfg.data.std, cfg.run.channels_last)
            rows.append(tta_logits(model, x, "flip_translate", True)[:valid])
        logits[batch] = torch.cat(rows)
    a, b = results[100], results[1000]
    assert a["count"] == b["count"] == 1000 and a["views"] == 6 and a["tta"] == "flip_translate"
    assert a["acc"] == b["acc"] and a["confusion"] == b["confusion"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    torch.testing.assert_close(logits[100], logits[1000], rtol=1e-5, atol=1e-5)
    assert logits[100].sum().item() == pytest.approx(logits[1000].sum().item(), rel=1e-5, abs=1e-4)
    plain = evaluate_model(model, eval_set, cfg, torch.device("cpu"))
    assert plain["views"] == 1 and plain["loss"] != a["loss"]  # the views are used


def _evaluator(*overrides):
    cfg, model = _tiny("data.synthetic_test=64", *overrides)
    _, eval_set, _ = build_datasets(cfg)
    precision = SimpleNamespace(autocast=contextlib.nullcontext, inputs=lambda x: x)
    return Evaluator(cfg, model, eval_set, torch.device("cpu"), precision, model)


def test_epoch_evaluations_are_plain_unless_tta_every_epoch():
    ev = _evaluator("eval.tta=flip_translate")
    epoch = ev.maybe_run(2, last=True)
    assert epoch is not None and (epoch["tta"], epoch["views"]) == ("none", 1)
    assert ev.plain_time_s == epoch["eval_time_s"] > 0
    final = ev.final()  # run again, with the views
    assert final is not epoch and (final["tta"], final["views"]) == ("flip_translate", 6)
    assert ev.plain_time_s == epoch["eval_time_s"]

    ev = _evaluator("eval.tta=flip", "eval.tta_every_epoch=true")
    epoch = ev.maybe_run(2, last=True)
    assert epoch is not None and epoch["tta"] == "flip" and ev.final() is epoch  # not evaluated twice
    assert ev.plain_time_s is None

    ev = _evaluator()  # eval.tta: none, the final evaluation is the last epoch's
    epoch = ev.maybe_run(2, last=True)
    assert ev.final() is epoch and epoch["tta"] == "none"


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.tta=rotate", "eval.tta: must be one of none, flip, flip_translate, got 'rotate'"),
        ("train.no_decay=[norm, gamma]", "train.no_decay: must be one of norm, bias, got 'gamma'"),
    ],
)
def test_unknown_tta_mode_and_no_decay_group_exit_2_in_one_line(override, message):
    res = cli_here("config", "--config", SMOKE, override)
    assert res.returncode == 2
    assert res.stderr.strip() == f"cifar-dist: command line: {message}"


def test_eval_tta_option_takes_a_mode_and_bare_means_flip():
    from cifar_dist.cli.main import _bare_tta, build_parser

    def parsed(*argv):
        return build_parser().parse_known_args(["eval", "--checkpoint", "R", *_bare_tta(list(argv))])[0].tta

    assert parsed() is None and parsed("--tta") == "flip" and parsed("--tta", "flip_translate") == "flip_translate"
    assert parsed("--tta=none") == "none"
    assert parsed("--tta", "data.root=/d") == "flip"  # an override after the bare flag is no mode
    res = cli_here("eval", "--checkpoint", "R", "--tta", "rotate")
    assert res.returncode == 2 and "argument --tta: invalid choice: 'rotate'" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flip_translate_is_the_same_for_one_and_two_processes(tmp_path):
    """A real 2-process run (torchrun, gloo) with eval.tta=flip_translate: the same weights
    (train.exact_reduce) and the same test accuracy as one process; `cifar-dist eval --tta
    flip_translate` of the saved weights agrees."""
    args = [
        "--config",
        SMOKE,
        "data.synthetic_train=512",
        "data.synthetic_test=250",  # 125 per rank, in batches of 100: a padded batch on each
        "data.eval_batch_size=100",
        "train.max_steps=8",
        "eval.tta=flip_translate",
        "run.progress=false",
        "run.plots=false",
    ]
    one = cli("train", "--out", tmp_path / "p1", *args)
    torchrun(2, "--out", tmp_path / "p2", *args)
    assert "flip_translate TTA: 6 views" in one.stdout
    s1, s2 = summary(tmp_path / "p1"), summary(tmp_path / "p2")
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert (tmp_path / "p1" / "model.safetensors").read_bytes() == (tmp_path / "p2" / "model.safetensors").read_bytes()
    assert s1["test_acc"] == s2["test_acc"] and s1["test_loss"] == pytest.approx(s2["test_loss"], rel=1e-6)
    assert s1["tta"] == "flip_translate" and s1["tta_views"] == 6 and s1["eval_images"] == 250
    assert s1["final_eval_time_s"] > 0 and s1["plain_eval_time_s"] > 0  # the epoch's plain evaluation
    res = cli("eval", "--checkpoint", tmp_path / "p1", "--tta", "flip_translate", "data.eval_batch_size=250")
    assert "(flip_translate TTA: 6 views)" in res.stdout
    ev = json.loads((tmp_path / "p1" / "eval_tta_flip_translate.json").read_text())
    assert ev["count"] == 250 and ev["acc"] == s1["test_acc"]
