"""Weight averages (train.ema, train.lookahead, eval.use_ema) and stateful callbacks: the EMA
and Lookahead against hand-computed averages, evaluation of the EMA, their checkpoint files and
an exact resume, in this process; then, in real processes, the same EMA bits on 1, 2 and 4
processes and a kill -9 + --resume that ends byte-identical."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from tally import Tally

from cifar_dist.config.schema import LookaheadConfig
from cifar_dist.errors import CheckpointError, ConfigError
from cifar_dist.inference.evaluate import evaluate_model
from cifar_dist.model.resnet import build_model
from cifar_dist.trainer.averaging import EMA_FILE, LOOKAHEAD_FILE, Lookahead
from cifar_dist.trainer.callbacks import STATE_FILE, Callbacks

from conftest import FAULT_ARG, SMOKE, accelerate_launch, cli, cli_here, fault_env, summary, torchrun
from helpers import build, fit, restore


class Recorder:
    """A callback: float64 copies of the model's state before the first step and after each."""

    def __init__(self):
        self.seen = []

    def _take(self, model):
        self.seen.append(
            {k: v.detach().double() if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
        )

    def on_train_start(self, run):
        self.model = run.model
        self._take(run.model)

    def on_step_end(self, step, metrics):
        self._take(self.model)


def test_the_ema_is_the_hand_computed_average_of_weights_and_batchnorm_buffers(tmp_path):
    """decay 0.8, every 2nd step, a plain copy for the first 2 steps, 7 steps: copies after
    steps 1 and 2, averages after 4 and 6, nothing after 7 (num_batches_tracked says 6)."""
    recorder = Recorder()
    trainer = build(
        tmp_path / "run",
        "train.max_steps=7",
        "train.ema.decay=0.8",
        "train.ema.every_steps=2",
        "train.ema.warmup_steps=2",
        callbacks=[recorder],
    )
    fit(trainer)
    expected = dict(recorder.seen[0])
    for done, w in enumerate(recorder.seen[1:], start=1):
        if done <= 2:
            expected = dict(w)
        elif done % 2 == 0:
            expected = {k: 0.8 * expected[k] + 0.2 * w[k] if w[k].is_floating_point() else w[k] for k in w}
    ema = trainer.averages.ema.module.state_dict()
    assert ema.keys() == expected.keys() and any("running_var" in k for k in ema)
    for k, v in ema.items():
        assert v.dtype == (torch.float32 if v.is_floating_point() else torch.int64), k
        torch.testing.assert_close(v.double(), expected[k].double(), rtol=1e-5, atol=1e-6, msg=k)
    tracked = [k for k in ema if k.endswith("num_batches_tracked")]
    assert tracked and all(int(ema[k]) == 6 and int(trainer.model.state_dict()[k]) == 7 for k in tracked)


def test_lookahead_is_the_hand_computed_slow_and_fast_weights_after_2k_steps():
    """k=3, alpha=0.5, plain SGD on fixed gradients: after steps 3 and 6 the slow weights move
    half way to the fast ones and the fast ones are reset to them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    lookahead = Lookahead(LookaheadConfig(k=3, alpha=0.5), model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(6)]
    fast = [p.detach().double().clone() for p in model.parameters()]
    slow = [f.clone() for f in fast]
    for done, step_grads in enumerate(grads, start=1):
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        optimizer.step()
        lookahead.after_step(done)
        fast = [f - 0.1 * g.double() for f, g in zip(fast, step_grads)]
        if done % 3 == 0:
            slow = [s + 0.5 * (f - s) for s, f in zip(slow, fast)]
            fast = [s.clone() for s in slow]
    for p, f, s, kept in zip(model.parameters(), fast, slow, lookahead.slow):
        torch.testing.assert_close(p.detach().double(), f, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kept.double(), s, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), lookahead.slow))  # step 6 reset them


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_the_bench_step_updates_the_ema_and_lookahead_as_training_does(tmp_path):
    """`cifar-dist bench train.ema.decay=...` times the averages too: its step, fed the same
    batches, leaves the same bits as 5 steps of the training loop."""
    from cifar_dist.trainer.epoch import EpochTotals

    args = ("train.max_steps=5", "train.ema.decay=0.5", "train.lookahead.k=2")
    trained = build(tmp_path / "loop", *args)
    fit(trained)
    benched = build(tmp_path / "bench", *args)
    totals = EpochTotals.start(benched.device)
    for step, micro in zip(range(1, 6), benched.loader.iter_epoch(0)):
        benched.steady_step(micro, step, totals)
    ema = benched.averages.ema.module.state_dict()
    for a, b in [
        (trained.averages.ema.module.state_dict(), ema),
        (trained.averages.lookahead.state_dict(), benched.averages.lookahead.state_dict()),
        (trained.model.state_dict(), benched.model.state_dict()),
    ]:
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert not all(torch.equal(ema[k], v) for k, v in benched.model.state_dict().items())  # an average, not a copy


def test_eval_use_ema_evaluates_the_ema_weights_and_leaves_training_alone(tmp_path):
    """The same EMA run evaluated on its training weights and on its EMA weights: the training
    weights and BatchNorm state are the same bits either way, and each accuracy is that of the
    weights it names, evaluated afresh."""
    runs = {
        use: build(tmp_path / f"use_ema_{use}", "train.max_steps=3", "train.ema.decay=0.5", f"eval.use_ema={use}")
        for use in ("true", "false")
    }
    for trainer in runs.values():
        fit(trainer)
    on, off = runs["true"], runs["false"]
    assert all(torch.equal(v, _state(off.model)[k]) for k, v in _state(on.model).items())
    assert all(torch.equal(v, _state(off.averages.ema.module)[k]) for k, v in _state(on.averages.ema.module).items())
    assert on.evaluated is on.averages.ema.module and off.evaluated is off.model
    for trainer, weights in ((on, _state(on.averages.ema.module)), (off, _state(off.model))):
        fresh = build_model(trainer.cfg.model).to(memory_format=torch.channels_last)
        fresh.load_state_dict(weights)
        again = evaluate_model(fresh, trainer.evaluator.eval_set, trainer.cfg, trainer.device)
        assert trainer.evaluator.last["acc"] == again["acc"] and trainer.evaluator.last["loss"] == pytest.approx(
            again["loss"], rel=1e-6
        )
    assert on.evaluator.last["loss"] != off.evaluator.last["loss"]  # decay 0.5: other weights


def test_eval_and_load_model_of_a_checkpoint_of_a_use_ema_run_take_its_ema(tmp_path):
    """`cifar-dist eval` and `load_model` give the run's own weights for a checkpoint, as for
    the final weights: the EMA that eval.use_ema evaluated, not the training weights beside it
    (named as a file, those are what they take)."""
    out = tmp_path / "run"
    args = ("--config", SMOKE, "--out", out, "data.synthetic_train=256", "data.synthetic_test=128")
    args += ("train.max_steps=4", "checkpoint.every_steps=4", "train.ema.decay=0.5", "eval.use_ema=true")
    res = cli_here("train", *args, "run.progress=false", "run.plots=false")
    assert res.returncode == 0, res.stderr
    final = summary(out)["test_acc"]
    ckpt = out / "checkpoints" / "step_00000004"
    for where, said in [(out, "final weights"), (ckpt, "checkpoint step_00000004: its EMA weights (eval.use_ema)")]:
        res = cli_here("eval", "--checkpoint", where)
        assert res.returncode == 0 and f"evaluating {said} of {out}" in res.stdout, res.stdout + res.stderr
    assert json.loads((out / "eval.json").read_text())["acc"] == final
    assert json.loads((out / "eval-step_00000004.json").read_text())["acc"] == final
    res = cli_here("eval", "--checkpoint", ckpt / "model.safetensors")
    assert res.returncode == 0 and "evaluating weights model.safetensors of" in res.stdout, res.stdout
    from safetensors.torch import load_file

    from cifar_dist.storage.checkpoint import load_model

    for where, file in [(ckpt, ckpt / EMA_FILE), (ckpt / "model.safetensors", ckpt / "model.safetensors")]:
        loaded, saved = load_model(where).state_dict(), load_file(file)
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved), where


def test_eval_evaluates_what_its_command_line_asks_or_refuses_in_one_line(tmp_path):
    """eval.use_ema=true/false picks the EMA or the training weights wherever the run keeps them
    (a run that evaluated its training weights: the EMA from its last checkpoint); eval.tta is
    taken like --tta; where the weights asked for are not there, a key eval would ignore, or
    --tta and eval.tta disagreeing: one line, exit 2, nothing written."""
    out = tmp_path / "run"
    args = ("--config", SMOKE, "--out", out, "data.synthetic_train=256", "data.synthetic_test=128")
    args += ("train.max_steps=4", "checkpoint.every_steps=4", "train.ema.decay=0.5", "run.progress=false")
    assert cli_here("train", *args, "run.plots=false").returncode == 0
    ckpt = out / "checkpoints" / "step_00000004"

    def acc(*argv):
        res = cli_here("eval", "--checkpoint", *argv)
        assert res.returncode == 0, res.stderr
        written = Path(res.stdout.strip().splitlines()[-1].removeprefix("written "))
        return res.stdout.splitlines()[0], json.loads(written.read_text())["acc"]

    said, training = acc(out, "eval.use_ema=false")
    assert said == f"evaluating final weights (training) of {out}" and training == summary(out)["test_acc"]
    said, ema = acc(out, "eval.use_ema=true")
    assert said == f"evaluating newest checkpoint step_00000004: its EMA weights (eval.use_ema=true) of {out}"
    assert ema == acc(ckpt / EMA_FILE)[1] and ema != training  # decay 0.5 after 4 steps: other weights
    assert acc(ckpt, "eval.use_ema=false")[1] == training
    assert (out / "eval-step_00000004-ema.json").is_file() and (out / "eval-training.json").is_file()
    res = cli_here("eval", "--checkpoint", out, "eval.tta=flip")
    assert "(flip TTA: 2 views)" in res.stdout and (out / "eval_tta.json").is_file(), res.stdout

    plain = tmp_path / "plain"
    no_ema = [a for a in args[4:] if not a.startswith("train.ema")]
    assert cli_here("train", *args[:3], plain, *no_ema, "run.plots=false").returncode == 0
    before = sorted(p.name for p in plain.rglob("*"))
    for argv, line in [
        ((plain, "eval.use_ema=true"), "eval.use_ema: needs train.ema"),
        ((ckpt / "model.safetensors", "eval.use_ema=true"), "a named weights file is evaluated as it is"),
        ((plain, "train.lr=0.5"), "train.lr: eval evaluates the run's saved weights with its config"),
        ((plain, "model.widths=[8]"), "model.widths: eval evaluates"),
        ((plain, "--tta", "flip_translate", "eval.tta=flip"), "--tta flip_translate and eval.tta=flip disagree"),
    ]:
        res = cli_here("eval", "--checkpoint", *argv)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and line in res.stderr, res.stderr
    assert sorted(p.name for p in plain.rglob("*")) == before


def test_a_resume_continues_the_ema_lookahead_and_callback_state_exactly(tmp_path):
    """A mid-epoch checkpoint holds ema.safetensors, lookahead.safetensors and callbacks.json
    (in its manifest); resuming from it ends with the uninterrupted run's bits in all of them."""
    args = ("train.max_steps=8", "checkpoint.every_steps=3", "checkpoint.keep=10")
    args += ("train.ema.decay=0.7", "train.ema.every_steps=2", "train.lookahead.k=3", "train.lookahead.alpha=0.6")
    full = build(tmp_path / "full", *args, callbacks=[Tally()])
    fit(full)
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000003"
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {EMA_FILE, LOOKAHEAD_FILE, STATE_FILE} <= set(manifest)
    assert json.loads((ckpt / STATE_FILE).read_text())["tally:Tally"]["steps"] == 3
    copy = tmp_path / "copy"
    shutil.copytree(full.run_dir / "checkpoints", copy / "checkpoints")
    tally = Tally()
    resumed = build(copy, *args, callbacks=[tally])
    fit(resumed, restore(resumed, copy / "checkpoints" / "step_00000003"))
    assert tally.steps == 8 and tally.epochs == 1
    last = "checkpoints/step_00000008"
    for name in ("model.safetensors", EMA_FILE, LOOKAHEAD_FILE, STATE_FILE):
        assert (tmp_path / "full" / last / name).read_bytes() == (copy / last / name).read_bytes(), name


def test_a_checkpoint_without_the_average_a_run_keeps_is_one_line(tmp_path):
    trainer = build(tmp_path / "run", "train.max_steps=1", "train.lookahead.k=2")
    fit(trainer)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    (ckpt / LOOKAHEAD_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{LOOKAHEAD_FILE}: missing"):
        trainer.averages.load(ckpt)


class Plain:
    pass


class Counter:
    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_callback_state_is_saved_under_each_name_and_restored(tmp_path):
    """Named by spec (or module:qualname), repeats numbered; stateless callbacks write nothing;
    a state JSON cannot hold is one line naming the callback."""
    Callbacks([Plain()]).save(tmp_path)
    assert not (tmp_path / STATE_FILE).exists()
    saved = Callbacks([Counter(3), Plain(), Counter(5)], ["pkg.hooks:Counter", "pkg:Plain", "pkg.hooks:Counter"])
    saved.save(tmp_path)
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {
        "pkg.hooks:Counter": {"n": 3},
        "pkg.hooks:Counter#2": {"n": 5},
    }
    a, b, extra = Counter(), Counter(), Counter()
    Callbacks([a, b], ["pkg.hooks:Counter", "pkg.hooks:Counter"]).plus([extra]).load(tmp_path)
    assert (a.n, b.n, extra.n) == (3, 5, 0)  # test_averaging:Counter was not saved: starts fresh
    assert Callbacks([Counter()]).names == ["test_averaging:Counter"]
    with pytest.raises(ConfigError, match=r"^run.callbacks: x:Bad: state_dict\(\) returned what JSON cannot hold"):
        Callbacks([Counter(object())], ["x:Bad"]).save(tmp_path)
    (tmp_path / STATE_FILE).write_text("[1]")
    with pytest.raises(CheckpointError, match="callbacks.json: unreadable"):
        saved.load(tmp_path)


@pytest.mark.parametrize("key", ["train.ema.decay=0.99", "train.lookahead.k=4"])
def test_weight_averages_under_deepspeed_are_refused_in_one_line(tmp_path, monkeypatch, key):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    res = cli_here("train", "--config", SMOKE, "--out", tmp_path / "ds", "train.exact_reduce=false", key)
    group = key.split("=")[0].rsplit(".", 1)[0]
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"cifar-dist: {group}: not with DeepSpeed (its engine owns the weights); set {group}=null"
    ]
    assert not (tmp_path / "ds").exists()


# In real processes: 16 steps of 64 images, 16 steps per epoch on 1,024 images.
AVERAGED = [
    "data.synthetic_train=1024",
    "run.progress=false",
    "run.plots=false",
    "train.ema.decay=0.9",
    "train.ema.warmup_steps=3",
    "train.ema.every_steps=2",
    "train.lookahead.k=5",
]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_ema_is_the_same_bits_on_1_2_and_4_processes_and_is_what_eval_use_ema_exports(tmp_path):
    """train.exact_reduce with model.bn_group (the smoke recipe): the same weights on any
    power-of-two process count, so the same EMA and Lookahead; with eval.use_ema the run's
    model.safetensors is the EMA and summary.json says so."""
    args = ["--config", SMOKE, *AVERAGED, "train.max_steps=12", "eval.use_ema=true"]
    cli("train", "--out", tmp_path / "p1", *args)
    torchrun(2, "--out", tmp_path / "p2", *args)
    accelerate_launch("cpu.yaml", 4, "--out", tmp_path / "p4", *args)
    final = "checkpoints/step_00000012"
    for name in ("model.safetensors", EMA_FILE, LOOKAHEAD_FILE):
        first = (tmp_path / "p1" / final / name).read_bytes()
        assert all((tmp_path / p / final / name).read_bytes() == first for p in ("p2", "p4")), name
    from safetensors.torch import load_file

    exported, ema = load_file(tmp_path / "p1" / "model.safetensors"), load_file(tmp_path / "p1" / final / EMA_FILE)
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    for p in ("p1", "p2", "p4"):
        assert summary(tmp_path / p)["weights"] == "ema"
        assert summary(tmp_path / p)["test_acc"] == summary(tmp_path / "p1")["test_acc"]


def _evaluations(run_dir) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["test_loss"], r["test_acc"]) for r in rows]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_then_resume_with_ema_lookahead_tta_and_a_stateful_callback_is_byte_identical(tmp_path):
    """Checkpoints every 6 steps; SIGKILL before step 21 (mid-epoch 2); --resume from 18: the
    weights, the EMA, the slow weights, the callback's state and every flip-and-translate TTA
    evaluation end as in an uninterrupted run."""
    args = ["--config", SMOKE, *AVERAGED, "train.max_steps=24", "checkpoint.every_steps=6", "checkpoint.keep=10"]
    args += ["eval.tta=flip_translate", "eval.tta_every_epoch=true"]
    args.append(FAULT_ARG.replace("]", ",tally:Tally]"))
    cli("train", "--out", tmp_path / "reference", *args, env=fault_env(""))
    out = tmp_path / "run"
    res = cli("train", "--out", out, *args, env=fault_env("kill@21"), check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    res = cli("train", "--out", out, "--resume", *args, env=fault_env(""))
    assert "step 18)" in res.stdout, res.stdout
    final = "checkpoints/step_00000024"
    assert json.loads((out / final / STATE_FILE).read_text())["tally:Tally"]["steps"] == 24
    for name in ("model.safetensors", f"{final}/model.safetensors", f"{final}/{EMA_FILE}", f"{final}/{LOOKAHEAD_FILE}"):
        assert (tmp_path / "reference" / name).read_bytes() == (out / name).read_bytes(), name
    assert (tmp_path / "reference" / final / STATE_FILE).read_bytes() == (out / final / STATE_FILE).read_bytes()
    assert summary(out)["weights"] == "model"
    reference = _evaluations(tmp_path / "reference")
    assert _evaluations(out) == reference and [epoch for epoch, _, _ in reference] == [1, 2]
    assert summary(out)["tta_views"] == 6 and summary(out)["test_acc"] == summary(tmp_path / "reference")["test_acc"]
