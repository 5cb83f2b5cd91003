"""The training loop in this process: Trainer.train_step and Trainer.fit on the smoke model,
no subprocess. The learning rate at every step, the non-finite check, the checkpoint
schedule, stop requests, resume and evaluation counting, each in a second or two; the
end-to-end tests keep only what a real process (or several) can show."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from cifar_dist.errors import NonFiniteError
from cifar_dist.trainer.control import CONTROL_EVERY
from cifar_dist.trainer.epoch import EpochTotals
from cifar_dist.trainer.stopping import StopReason

from helpers import SPE, build, fit, restore


def weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def poison(model) -> None:
    """One NaN in the first weight: the next step's loss and gradients are NaN."""
    first = next(model.parameters())
    with torch.no_grad():
        first[(0,) * first.dim()] = float("nan")


def checkpoint_steps(run_dir) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))


class AroundSteps:
    """A callback: ``before(trainer, step)`` and ``after(trainer, step)`` around every step fit runs."""

    def __init__(self, before=None, after=None):
        self.before, self.after, self.trainer = before, after, None

    def on_train_start(self, run):
        self.trainer = run

    def on_step_start(self, step):  # ``before``/``after`` get the step's index from 0
        if self.before is not None:
            self.before(self.trainer, step - 1)

    def on_step_end(self, step, metrics):
        if self.after is not None:
            self.after(self.trainer, step - 1)


class LrLog(list):
    """A callback: (step index from 0, learning rate the optimizer stepped with) for every step fit runs."""

    def on_step_end(self, step, metrics):
        self.append((step - 1, metrics["lr"]))


@pytest.fixture
def lr_log():
    return LrLog()


@pytest.fixture
def commits(monkeypatch):
    """The global step of every checkpoint fit commits, in order."""
    from cifar_dist.storage.checkpoint import CheckpointWriter

    seen = []
    real = CheckpointWriter.commit

    def spy(self, tmp, step):
        seen.append(step)
        return real(self, tmp, step)

    monkeypatch.setattr(CheckpointWriter, "commit", spy)
    return seen


def test_train_step_returns_a_device_flag_updates_the_weights_and_clears_gradients(tmp_path):
    trainer = build(tmp_path / "run")
    before = weights(trainer)
    totals = EpochTotals.start(trainer.device)
    micro = next(iter(trainer.loader.iter_epoch(0)))
    bad = trainer.train_step(micro, 1, totals)
    assert isinstance(bad, torch.Tensor) and bad.dim() == 0 and bad.device == trainer.device
    assert float(bad) == 0.0 and totals.count == 64
    assert all(q.grad is None for q in trainer.model.parameters())
    # step 0 of the one-cycle schedule runs at lr 0: nothing may move yet
    assert all(torch.equal(before[k], v) for k, v in weights(trainer).items() if "weight" in k)
    bad = trainer.train_step(micro, 2, totals)
    assert any(not torch.equal(before[k], v) for k, v in weights(trainer).items() if "weight" in k)
    poison(trainer.model)
    assert float(trainer.train_step(micro, 3, totals)) > 0


def test_fit_steps_the_one_cycle_schedule_at_every_step_and_after_a_resume(tmp_path, lr_log):
    trainer = build(tmp_path / "run", "checkpoint.every_steps=5", "checkpoint.keep=10", callbacks=[lr_log])
    state = fit(trainer)
    # smoke: lr 0.2, linear warm-up over half an epoch (4 steps), then linear to 0 at step 16
    expected = [0.2 * s / 4 if s < 4 else 0.2 * (16 - s) / 12 for s in range(16)]
    assert [s for s, _ in lr_log] == list(range(16))
    assert [lr for _, lr in lr_log] == pytest.approx(expected, abs=1e-12)
    assert [r["lr"] for r in state.history] == pytest.approx([expected[7], expected[15]])
    lr_log.clear()
    again = build(tmp_path / "again", callbacks=[lr_log])
    fit(again, restore(again, trainer.run_dir / "checkpoints" / "step_00000005"))
    assert lr_log == [(s, pytest.approx(expected[s], abs=1e-12)) for s in range(5, 16)]


def test_the_papers_epoch_schedule_is_constant_within_an_epoch(tmp_path, lr_log):
    """schedule_unit=epoch: like the paper's LambdaLR stepped once per epoch, the first
    epoch of warm-up runs at lr 0, and cosine then takes over from the second."""
    trainer = build(
        tmp_path / "run",
        "train.schedule=warmup_cosine",
        "train.schedule_unit=epoch",
        "train.warmup_epochs=1",
        "train.epochs=3",
        "train.lr=0.1",
        callbacks=[lr_log],
    )
    fit(trainer)
    per_epoch = [0.0, 0.1, 0.1 * 0.5 * (1 + math.cos(math.pi / 2))]
    assert [lr for _, lr in lr_log] == pytest.approx([lr for lr in per_epoch for _ in range(SPE)], abs=1e-12)


def test_checkpoint_schedule_every_steps_and_every_epoch_and_keep(tmp_path, commits):
    trainer = build(tmp_path / "run", "checkpoint.every_steps=3", "checkpoint.every_epochs=1", "checkpoint.keep=2")
    fit(trainer)
    # every 3 steps inside an epoch, each epoch end (8), and the end of training (16)
    assert commits == [3, 6, 8, 9, 12, 15, 16]
    assert checkpoint_steps(trainer.run_dir) == [15, 16]  # keep=2
    assert not list((trainer.run_dir / "checkpoints").glob(".tmp-*"))
    state = json.loads((trainer.run_dir / "checkpoints" / "step_00000015" / "state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 7, 15)
    assert state["partial"]["count"] == 7 * 64  # the epoch's running loss survives a resume


def test_epoch_checkpoints_follow_every_epochs(tmp_path, commits):
    fit(build(tmp_path / "run", "checkpoint.every_epochs=2", "train.epochs=3"))
    assert commits == [16, 24]  # epoch 2, then the end of training


def test_a_nan_stops_fit_naming_its_step_before_any_checkpoint_holds_it(tmp_path, commits):
    """A NaN weight before the 5th step (step 5: steps are counted from 1): the check due with
    checkpoint 6 reads the flag first, so only checkpoint 3 exists, and it is finite."""
    trainer = build(
        tmp_path / "run",
        "checkpoint.every_steps=3",
        callbacks=[AroundSteps(before=lambda p, step: poison(p.model) if step == 4 else None)],
    )
    with pytest.raises(NonFiniteError, match=r"became NaN/Inf at step 5 \(epoch 1\)"):
        fit(trainer)
    assert commits == [3] and checkpoint_steps(trainer.run_dir) == [3]
    from safetensors.torch import load_file

    saved = load_file(str(trainer.run_dir / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert all(bool(v.float().isfinite().all()) for v in saved.values())


def test_a_stop_request_checkpoints_at_the_next_control_read_and_resuming_gives_the_same_run(tmp_path):
    """A STOP file appears during step 8 (the first of epoch 2); the flags are read every
    CONTROL_EVERY steps, so the run stops after step 10 with a mid-epoch checkpoint."""
    reference = build(tmp_path / "reference")
    fit(reference)
    trainer = build(
        tmp_path / "run",
        callbacks=[AroundSteps(before=lambda p, step: p.stop.stop_file.write_text("") if step == 8 else None)],
    )
    state = trainer.fit()
    assert trainer.stop_reason is StopReason.STOP_FILE
    assert CONTROL_EVERY == 10 and state.global_step == 10
    assert checkpoint_steps(trainer.run_dir) == [8, 10]
    resumed = build(tmp_path / "resumed")
    fit(resumed, restore(resumed, trainer.run_dir / "checkpoints" / "step_00000010"))
    assert all(torch.equal(v, weights(resumed)[k]) for k, v in weights(reference).items())


def test_resume_from_a_mid_epoch_checkpoint_gives_the_same_weights_and_history(tmp_path):
    full = build(tmp_path / "full", "checkpoint.every_steps=5", "checkpoint.keep=10")
    history = fit(full).history
    copy = tmp_path / "copy"
    shutil.copytree(full.run_dir / "checkpoints", copy / "checkpoints")
    resumed = build(copy)
    state = restore(resumed, copy / "checkpoints" / "step_00000005")
    assert (state.epoch, state.step_in_epoch, state.global_step) == (0, 5, 5)
    state = fit(resumed, state)
    assert all(torch.equal(v, weights(resumed)[k]) for k, v in weights(full).items())
    timing = ("epoch_time_s", "images_per_s", "tflops_per_s", "mfu", "peak_memory_gb")  # measured, not trained
    assert [{k: v for k, v in r.items() if k not in timing} for r in state.history] == [
        {k: v for k, v in r.items() if k not in timing} for r in history
    ]


def test_evaluation_runs_when_due_and_counts_every_image_once(tmp_path):
    trainer = build(tmp_path / "run", "eval.every_epochs=2", "train.epochs=3", "data.eval_batch_size=100")
    state = fit(trainer)
    assert ["test_acc" in r for r in state.history] == [False, True, True]
    ev = trainer.evaluator.last
    assert ev["count"] == 256 and sum(map(sum, ev["confusion"])) == 256  # 100 + 100 + 56
    assert ev["acc"] == pytest.approx(sum(ev["confusion"][i][i] for i in range(10)) / 256)
    assert 0 < ev["loss"] < 10


@pytest.mark.parametrize(
    "overrides, steps",
    [
        (["run.precision=fp32"], 22),
        (["run.precision=bf16"], 22),
        # the weight averages update on the device, due by the host's step count alone
        (["run.precision=fp32", "train.ema.every_steps=2", "train.ema.warmup_steps=3", "train.lookahead.k=3"], 22),
        (["data.loader=gpu", "run.precision=fp32", "data.color_jitter=0.1", "data.rotation=10"], 22),
        # airbench94's network and pieces: a frozen whitening bias (0 epochs of training), per-group
        # learning rates, Lookahead with its ramp, buffers and last step, alternating flip, reflect crop
        (
            [
                "run.precision=fp32",
                "model.name=airbench94",
                "model.whiten_bias_epochs=0",
                "train.norm_lr_scale=64",
                "train.lookahead.k=3",
                "train.lookahead.ramp_power=3",
                "train.lookahead.buffers=true",
                "train.lookahead.end_on_slow=true",
                "data.flip=alternating",
                "data.crop_pad_mode=reflect",
            ],
            22,
        ),
        (["data.loader=gpu", "run.precision=bf16", "data.color_jitter=0.1", "data.rotation=10"], 22),
        # fused kernels, as optimizer_impl=auto picks on GPUs: GradScaler then skips without a host read
        (
            [
                "run.precision=fp16",
                "train.optimizer_impl=fused",
                "train.exact_reduce=false",
                "model.bn_group=0",
                "train.batch_size=16",
            ],
            12,
        ),
    ],
    ids=[
        "torch-fp32",
        "torch-bf16",
        "torch-fp32-ema-lookahead",
        "gpu-fp32-jitter-rotation",
        "torch-fp32-airbench94",
        "gpu-bf16-jitter-rotation",
        "torch-fp16-fused",
    ],
)
def test_the_step_reads_the_device_once_per_control_interval(tmp_path, overrides, steps):
    """On a GPU each host read of a device value stalls the step; cifar_dist reads the
    flags, the loss and the skip count once every CONTROL_EVERY steps, in one transfer (and
    the trackers get the loss from that read).
    Counted here (tests/sync_count.py) over the steady steps 1 to steps-2: the first
    step copies constants to the device once, the last one ends the run."""
    from sync_count import SyncCounter

    from cifar_dist.storage.metrics import MetricsLog
    from cifar_dist.storage.trackers import Trackers

    counter = SyncCounter()
    trainer = build(
        tmp_path / "run",
        "data.synthetic_train=2048",
        f"train.max_steps={steps}",
        "run.log_every_steps=10",
        *overrides,
        callbacks=[AroundSteps(before=lambda p, step: setattr(counter, "context", step))],
    )
    # with a tracker (the running loss every 10 steps) and the rows' FLOP/s, MFU and memory
    trainer.metrics = MetricsLog(trainer.run_dir, [], Trackers.start(["tensorboard"], trainer.run_dir, "t", {}, 0))
    with counter:
        fit(trainer)
    steady = [(step, what, where) for step, what, where in counter.calls if step is not None and 1 <= step <= steps - 2]
    control_steps = {s for s in range(1, steps - 1) if (s + 1) % CONTROL_EVERY == 0}
    assert {step for step, _, _ in steady} <= control_steps, steady
    assert len(steady) <= len(control_steps), steady


@pytest.mark.parametrize(
    "data, fragment",
    [
        ([], "expected a JSON object, got list"),
        ({"epoch": 0, "global_step": 3, "lr": 0.1}, "unknown key 'lr'"),
        ({"epoch": 0, "global_step": "3"}, "global_step: expected a whole number >= 0, got '3'"),
        ({"global_step": True}, "global_step: expected a whole number"),
        ({"world_size": 0}, "world_size: expected a whole number >= 1"),
        ({"partial": {"loss": 1.5}}, "partial: expected {} or whole numbers loss_units, correct and count"),
        ({"partial": {"loss_units": 5, "correct": 9, "count": 4}}, "more correct predictions than images"),
        ({"history": [{"epoch": "one"}]}, "history: a row without a whole epoch number"),
    ],
)
def test_a_state_json_of_the_wrong_shape_is_one_line_naming_the_key(data, fragment):
    from cifar_dist.errors import CheckpointError
    from cifar_dist.storage.state import parse_state

    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        parse_state(data, "ckpt/state.json")
    assert (
        parse_state({"epoch": 1, "global_step": 64, "history": [{"epoch": 1, "train_loss": 2.0}]}, "s").global_step
        == 64
    )


def test_a_callback_hook_that_returns_nothing_changes_nothing(tmp_path):
    """A logging callback whose on_loss forgets to return the loss once crashed the step
    ('NoneType' object has no attribute 'detach'); None now leaves the loss as it was."""

    class LogsTheLoss:
        def __init__(self):
            self.seen = []

        def on_loss(self, loss, step):
            self.seen.append(step)

    logger = LogsTheLoss()
    plain = build(tmp_path / "plain", "train.max_steps=3")
    fit(plain)
    logged = build(tmp_path / "logged", "train.max_steps=3", callbacks=[logger])
    fit(logged)
    assert logger.seen[:2] == [1, 1] and logger.seen[-1] == 3  # every chunk of every step (exact reduce)
    assert all(torch.equal(v, weights(logged)[k]) for k, v in weights(plain).items())


TIMING = ("epoch_time_s", "images_per_s", "tflops_per_s", "mfu", "peak_memory_gb")  # measured, not trained


def _trained(history) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def _ckpt(trainer, step: int):
    return trainer.run_dir / "checkpoints" / f"step_{step:08d}"


def test_a_run_that_has_ended_trains_no_further_step_and_a_longer_max_steps_continues_it_exactly(tmp_path):
    """A run that ended at train.max_steps=11 (3 steps into epoch 2), resumed from its last
    checkpoint, trains nothing: no step, no row, no checkpoint. Resumed with train.max_steps=14
    it goes on, and its weights and rows equal a run of 14 steps: the end-of-run checkpoint kept
    the unfinished epoch's sums, so epoch 2 has one row, over all its steps."""
    longer = build(tmp_path / "longer", "train.max_steps=14")
    expected = fit(longer).history
    short = build(tmp_path / "short", "train.max_steps=11")
    state = fit(short)
    assert state.ended == StopReason.FINISHED.value and [r["epoch"] for r in state.history] == [1, 2]

    again = build(tmp_path / "again", "train.max_steps=11")
    state = restore(again, _ckpt(short, 11))
    assert state.partial["count"] == 3 * 64  # the unfinished epoch's sums
    before = weights(again)
    trainer = again
    assert trainer.ended is StopReason.FINISHED
    state = trainer.fit()
    assert state.global_step == 11 and len(state.history) == 2 and checkpoint_steps(again.run_dir) == []
    assert all(torch.equal(v, weights(again)[k]) for k, v in before.items())

    extended = build(tmp_path / "extended", "train.max_steps=14")
    trainer = extended
    restore(extended, _ckpt(short, 11))
    assert trainer.ended is None
    state = trainer.fit()
    assert state.global_step == 14 and _trained(state.history) == _trained(expected)
    assert all(torch.equal(v, weights(extended)[k]) for k, v in weights(longer).items())


class StopAfter:
    """A callback: ends the run (``run.request_stop()``) after step ``step``."""

    def __init__(self, step: int):
        self.step, self.run = step, None

    def on_train_start(self, run):
        self.run = run

    def on_step_end(self, step, metrics):
        if step == self.step:
            self.run.request_stop()


@pytest.mark.parametrize("ends", [StopReason.REQUESTED, StopReason.TARGET])
def test_a_run_ended_early_stays_ended_when_resumed(tmp_path, ends):
    """Ended by a callback's request_stop (after step 5, inside epoch 1) or by
    eval.stop_at_target (a target every evaluation meets: after epoch 1): the end is recorded
    in the checkpoint's state, and a resume trains no further step though train.epochs is not
    done."""
    from cifar_dist.trainer.callbacks import StopAtTarget

    stopper, steps = (StopAfter(5), 5) if ends is StopReason.REQUESTED else (StopAtTarget(0.0001), SPE)
    ended = build(tmp_path / "run", callbacks=[stopper])
    state = fit(ended)
    assert state.global_step == steps and state.ended == ends.value
    resumed = build(tmp_path / "resumed")
    restore(resumed, _ckpt(ended, steps))
    assert resumed.ended is ends
    assert resumed.fit().global_step == steps and checkpoint_steps(resumed.run_dir) == []


def test_a_stop_asked_while_the_run_starts_up_stops_it_before_its_first_step(tmp_path):
    """A SIGTERM recorded before the loop began (building, compiling): no step is trained, the
    run stops as preempted, and nothing is checkpointed (it had trained nothing)."""
    trainer = build(tmp_path / "run")
    trainer.stop.signalled = "SIGTERM"
    state = trainer.fit()
    assert trainer.stop_reason is StopReason.SIGNAL and trainer.preempted
    assert state.global_step == 0 and state.history == [] and checkpoint_steps(trainer.run_dir) == []


def test_state_endings_are_the_stop_reasons_that_end_a_run():
    from cifar_dist.storage.state import ENDINGS

    assert set(ENDINGS) == {""} | {r.value for r in StopReason if not r.preempts}


class StepsSeen:
    """A stateful component of the kind the checkpointer takes: the steps it has seen, in a file."""

    collective = False

    def __init__(self):
        self.steps = 0

    def save(self, folder):
        (folder / "steps_seen.json").write_text(json.dumps({"steps": self.steps}))

    def load(self, folder):
        self.steps = json.loads((folder / "steps_seen.json").read_text())["steps"]

    def on_step_end(self, step, metrics):  # also a callback here, to be told of each step
        self.steps = step


def test_a_component_added_to_the_checkpointer_is_saved_checksummed_and_restored(tmp_path):
    """One more entry in the Trainer's components: every checkpoint holds its file, covered by
    the manifest (a changed byte is a damaged checkpoint), and a restore hands it back."""
    from cifar_dist.storage.checkpoint import check_checkpoint

    seen = StepsSeen()
    trainer = build(tmp_path / "run", "train.max_steps=5", "checkpoint.every_steps=3", callbacks=[seen])
    trainer.checkpointer.components["steps_seen"] = seen
    fit(trainer)
    assert checkpoint_steps(trainer.run_dir) == [3, 5]
    ckpt = _ckpt(trainer, 3)
    assert json.loads((ckpt / "steps_seen.json").read_text()) == {"steps": 3}
    assert "steps_seen.json" in json.loads((ckpt / "manifest.json").read_text())["files"]
    resumed, again = build(tmp_path / "resumed", "train.max_steps=5"), StepsSeen()
    resumed.checkpointer.components["steps_seen"] = again
    restore(resumed, ckpt)
    assert again.steps == 3
    (ckpt / "steps_seen.json").write_text(json.dumps({"steps": 4}))
    assert check_checkpoint(ckpt) is not None
