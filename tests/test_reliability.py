"""Kills, dead ranks, NaNs and a full disk never cost more than one checkpoint interval,
and never give a silently wrong answer.

Faults are injected by a callback (tests/faults.py, FAULT_INJECT=KIND@STEP[:RANK]):
kill (SIGKILL before a step), killsave (SIGKILL half-way through writing a checkpoint),
nan (a NaN loss), overflow (gradients that overflow fp16). Hostile and malformed input is in test_inputs.py.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time

import pytest

from conftest import (
    BIN,
    FAULT_ARG,
    REF_ARGS,
    REPO,
    SMOKE,
    base_env,
    cli,
    fault_env,
    free_port,
    kill_group,
    load_weights,
    max_diff,
    rewind,
    summary,
)

pytestmark = pytest.mark.slow
EVERY = 12  # the shared reference run (conftest.REF_ARGS): checkpoints at 12, 24, 32 (epoch end), 36, 48
STEPS = REF_ARGS[2:]  # its settings, after "--config SMOKE"
REF_ARGS_NO_STEPS = [a for a in STEPS if not a.startswith(("train.max_steps=", "data.synthetic_train="))]


def _checkpoint_steps(run_dir) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.mark.parametrize(
    "fault, killed_at, resumes_from",
    [
        ("kill@29", 29, 24),  # mid-epoch: resumes at the exact next sample of epoch 1
        ("killsave@36", 36, 32),  # during the write of checkpoint 36: the torn one is never used
        ("kill@45", 45, 36),  # in epoch 2
    ],
)
def test_kill_9_then_resume_gives_identical_weights(reference, tmp_path, fault, killed_at, resumes_from):
    out = tmp_path / "run"
    res = cli("train", "--config", SMOKE, "--out", out, *STEPS, FAULT_ARG, env=fault_env(fault), check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert not (out / "model.safetensors").exists()
    latest = _checkpoint_steps(out)[-1]
    assert latest == resumes_from and killed_at - latest <= EVERY  # at most one interval lost
    if fault.startswith("killsave"):
        torn = out / "checkpoints" / f".tmp-step_{killed_at:08d}"
        assert torn.is_dir() and (torn / "model.safetensors").exists()
    res = cli("train", "--config", SMOKE, "--out", out, "--resume", *STEPS)
    assert f"step {resumes_from})" in res.stdout, res.stdout
    assert summary(out)["steps"] == 48
    assert (reference / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the torn write was replaced


def _torchrun(spawn, out, *extra, fault=None, restarts=0):
    env, extra = (fault_env(fault), (*extra, FAULT_ARG)) if fault else (base_env(), extra)
    return spawn(
        [
            BIN / "torchrun",
            "--nproc_per_node",
            2,
            "--master_port",
            free_port(),
            "--max-restarts",
            restarts,
            "--monitor-interval",
            "0.5",
            REPO / "cifar_dist" / "train.py",
            "--config",
            SMOKE,
            "--out",
            out,
            "--resume",
            *STEPS,
            *extra,
        ],
        env=env,
    )


def test_a_killed_rank_ends_the_job_within_60_s_naming_it(spawn, tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(spawn, out, fault="kill@14:1")  # rank 1 dies two steps after checkpoint 12
    deadline = time.time() + 900
    while not (out / "checkpoints" / "step_00000012").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    seen = time.time()
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the job still ran 60 s after rank 1 was killed: {proc.communicate()}")
    print(f"torchrun exited {proc.returncode}, {time.time() - seen:.1f} s after checkpoint 12 appeared")
    assert proc.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", stderr) and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    assert _checkpoint_steps(out) == [12]  # intact, and loads
    load_weights(out / "checkpoints" / "step_00000012")
    assert json.loads((out / "checkpoints" / "step_00000012" / "state.json").read_text())["global_step"] == 12


def test_torchrun_max_restarts_resumes_and_finishes_with_the_same_weights(spawn, reference, tmp_path):
    """The same fault under --max-restarts=1: torchrun restarts both ranks, which resume from
    checkpoint 12 (faults fire in the first attempt only). exact_reduce makes 2 processes
    give the weights of 1, so the single-process reference applies."""
    out = tmp_path / "run"
    proc = _torchrun(spawn, out, fault="kill@14:1", restarts=1)
    stdout, stderr = proc.communicate(timeout=280)
    assert proc.returncode == 0, stderr[-4000:]
    assert "resuming from" in stdout and "step 12)" in stdout
    assert summary(out)["steps"] == 48 and summary(out)["world_size"] == 2
    assert max_diff(load_weights(reference), load_weights(out)) == 0


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_a_torchrun_restart_never_reads_the_previous_attempts_addresses(spawn, tmp_path, rendezvous):
    """The race behind a restarted job that hung in gloo's set-up, made certain: in the
    restarted attempt rank 1 comes 3 s late (tests/restart_probe.py), so rank 0 looks up its
    peer's address first. Without cifar_dist's per-attempt key space it finds the dead
    rank's and never connects (the probe then runs into this test's timeout). torchrun's
    static and c10d rendezvous both keep one store across attempts."""
    where = (
        ["--master_port", free_port()]
        if rendezvous == "static"
        else ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    )
    proc = spawn(
        [
            BIN / "torchrun",
            "--nproc_per_node",
            2,
            *where,
            "--max-restarts",
            1,
            "--monitor-interval",
            "0.5",
            REPO / "tests" / "restart_probe.py",
        ],
        cwd=tmp_path,
        env=base_env(),
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"the restarted ranks never formed their group: {proc.communicate()}")
    assert proc.returncode == 0, stderr[-3000:]
    for rank in (0, 1):
        assert f"attempt 1 rank {rank}: group of 2 formed" in stdout, stdout


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    res = cli("train", "--config", SMOKE, "--out", out, *STEPS, FAULT_ARG, env=fault_env("nan@21"), check=False)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        # nan@21: the loss of the 22nd step (steps are counted from 1)
        "cifar-dist: loss or gradients became NaN/Inf at step 22 (epoch 1); the last good checkpoint is kept"
    )
    # checkpoint 24 fell due after the NaN, before the flags' regular read at step 30: not written
    assert _checkpoint_steps(out) == [12]
    weights = load_weights(out / "checkpoints" / "step_00000012")
    assert all(bool(v.float().isfinite().all()) for v in weights.values())
    assert not (out / "model.safetensors").exists()


def test_fp16_loss_scaling_counts_skipped_steps_instead_of_stopping(tmp_path):
    """Gradients that overflow fp16 at step 6: the scaler skips the step, training goes on.
    (A NaN loss is no overflow: it stops an fp16 run like any other.) fp16 convolutions are
    slow on this CPU (7.5 s per smoke step of 64 images), hence 12 steps of 16 images."""
    args = [
        "--config",
        SMOKE,
        "run.precision=fp16",
        "train.exact_reduce=false",
        "model.bn_group=0",
        "train.batch_size=16",
        "train.max_steps=12",
        "data.synthetic_test=256",
        "run.progress=false",
        "run.plots=false",
    ]
    cli("train", "--out", tmp_path / "clean", *args)
    cli("train", "--out", tmp_path / "overflow", *args, FAULT_ARG, env=fault_env("overflow@6"))
    clean, s = summary(tmp_path / "clean"), summary(tmp_path / "overflow")
    row = json.loads((tmp_path / "overflow" / "metrics.jsonl").read_text().splitlines()[-1])
    print(f"fp16, 12 steps: {clean['skipped_steps']} skipped without the fault, {s['skipped_steps']} with it")
    assert s["steps"] == 12 and s["skipped_steps"] > clean["skipped_steps"]
    assert row["skipped_steps"] == s["skipped_steps"]
    assert math.isfinite(s["test_loss"])


def test_disk_full_while_saving_keeps_the_previous_checkpoint(reference, tmp_path):
    """Files may not grow past 16 KiB (RLIMIT_FSIZE, set in the warm process; what a full
    disk does to a write): the checkpoint of step 32 cannot be written."""
    out = rewind(reference, tmp_path / "run", step=24)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step_00000024").iterdir()}
    res = cli(
        "train",
        "--config",
        SMOKE,
        "--out",
        out,
        "--resume",
        *STEPS,
        env=base_env(CIFAR_DIST_TEST_FSIZE=16 * 1024),
        check=False,
    )
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("cifar-dist: ") and "cannot write checkpoint of step 32" in last, res.stderr[-3000:]
    assert "the previous checkpoint is intact" in last
    assert _checkpoint_steps(out) == [12, 24]
    assert {p.name: p.read_bytes() for p in (out / "checkpoints" / "step_00000024").iterdir()} == before
    assert not list((out / "checkpoints").glob(".tmp-*"))
    res = cli("train", "--config", SMOKE, "--out", out, "--resume", *STEPS)  # room again: it finishes
    assert (reference / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_ctrl_c_checkpoints_at_the_next_control_read_and_its_resume_command_finishes_the_same_run(reference, tmp_path):
    """One SIGINT before step 17: the run stops after step 20 (the next control read) with a
    checkpoint, exits 130 and prints the command that resumes it; that command alone (the
    saved config carries every override) ends byte-identical to the uninterrupted run."""
    import shlex

    out = tmp_path / "run"
    res = cli("train", "--config", SMOKE, "--out", out, *STEPS, FAULT_ARG, env=fault_env("sigint@17"), check=False)
    assert res.returncode == 130, res.stderr[-3000:]
    assert "Ctrl-C: stopping at the next checkpointable step" in res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last == (
        f"stopped by Ctrl-C at step 20; checkpoint written; resume with: cifar-dist train --out {out} --resume"
    )
    assert _checkpoint_steps(out) == [12, 20] and not (out / "PREEMPTED").exists()
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command[:2] == ["cifar-dist", "train"]
    res = cli(*command[1:], env=fault_env(""))  # the saved config names the fault callback; no fault now
    assert "resuming from" in res.stdout and "step 20)" in res.stdout
    assert (reference / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_ctrl_c_twice_aborts_at_once_and_leaves_nothing_corrupt(tmp_path):
    """Pressed twice after checkpoint 12: exit 130 at once, checkpoint 12 intact and named in the
    line. Pressed twice before any checkpoint: the run's fresh directory is removed, so the same
    --out starts again without --overwrite."""
    out = tmp_path / "run"
    res = cli("train", "--config", SMOKE, "--out", out, *STEPS, FAULT_ARG, env=fault_env("sigint2@17"), check=False)
    assert res.returncode == 130, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"cifar-dist: interrupted; newest checkpoint step_00000012 kept, resume with: "
        f"cifar-dist train --out {out} --resume"
    )
    assert _checkpoint_steps(out) == [12] and not list((out / "checkpoints").glob(".tmp-*"))
    load_weights(out / "checkpoints" / "step_00000012")
    fresh = tmp_path / "fresh"
    res = cli("train", "--config", SMOKE, "--out", fresh, *STEPS, FAULT_ARG, env=fault_env("sigint2@5"), check=False)
    assert res.returncode == 130
    assert res.stderr.strip().splitlines()[-1] == (
        f"cifar-dist: interrupted before the first checkpoint; nothing to keep, {fresh} removed"
    )
    assert not fresh.exists()


def _flip_a_bit(path, where: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "state.json"])
def test_a_flipped_bit_in_the_newest_checkpoint_is_found_and_the_previous_one_used(reference, tmp_path, damaged):
    """One bit of the data (past any header) of step 36's file: --resume names the file, resumes
    from step 32 and ends byte-identical to the uninterrupted run."""
    out = rewind(reference, tmp_path / "run", step=36)
    target = out / "checkpoints" / "step_00000036" / damaged
    if damaged == "state.json":  # one digit of global_step, still valid JSON of the right shape
        target.write_text(target.read_text().replace('"global_step": 36', '"global_step": 37'))
    else:
        _flip_a_bit(target, 0.9)
    res = cli("train", "--out", out, "--resume")
    assert (
        f"cifar-dist: warning: skipping damaged checkpoint step_00000036: {target}: differs from the manifest"
        in res.stderr
    ), res.stderr[-2000:]
    assert "resuming from" in res.stdout and "step 32)" in res.stdout
    assert (reference / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_no_intact_checkpoint_refuses_and_changes_nothing(reference, tmp_path):
    out = rewind(reference, tmp_path / "run", step=24)
    for ckpt in (out / "checkpoints").glob("step_*"):
        _flip_a_bit(ckpt / "model.safetensors", 0.9)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    res = cli("train", "--out", out, "--resume", check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"cifar-dist: {out / 'checkpoints'}: none of its 2 checkpoints is intact (see the warnings above); "
        "nothing was changed"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    res = cli("eval", "--checkpoint", out / "checkpoints" / "step_00000024", check=False)
    assert res.returncode == 2 and "damaged checkpoint:" in res.stderr and "differs from the manifest" in res.stderr


def _zero_byte_files(folder) -> list:
    return [str(p) for p in folder.rglob("*") if p.is_file() and p.stat().st_size == 0]


def test_a_full_disk_while_writing_metrics_is_one_line_and_leaves_no_empty_file(small_disk):
    """The run directory's file system fills up before step 31: the metrics row of epoch 1 (step
    32) cannot be written. One line naming metrics.jsonl, exit 1; no empty or temporary file."""
    out = small_disk / "run"
    res = cli("train", "--config", SMOKE, "--out", out, *STEPS, FAULT_ARG, env=fault_env("fill@31"), check=False)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cifar-dist: {out / 'metrics.jsonl'}: cannot write: No space left on device"), last
    assert not (out / "metrics.jsonl").exists() and _zero_byte_files(out) == []
    assert not list(out.rglob(".tmp-*")) and _checkpoint_steps(out) == [12, 24]


def test_a_full_disk_at_the_end_leaves_no_summary_a_sweep_would_trust(small_disk):
    out = small_disk / "run"
    res = cli(
        "train",
        "--config",
        SMOKE,
        "--out",
        out,
        *STEPS,
        "checkpoint.keep=1",
        FAULT_ARG,
        env=fault_env("fillend@0"),
        check=False,
    )
    assert res.returncode == 1, res.stderr[-2000:]
    assert "cannot write" in res.stderr.strip().splitlines()[-1] and "No space left on device" in res.stderr
    assert not (out / "summary.json").exists() and _zero_byte_files(out) == []
    (out / "filler").unlink()  # room again: the report draws what it could not
    assert cli("report", out).returncode == 0


def test_every_writer_fails_in_one_line_on_a_full_disk_and_keeps_the_old_file(small_disk):
    """summary.json, config.yaml and plots each on a real full disk: EnvironmentFault naming the
    file; an earlier version of the file stays whole; no temporary file is left."""
    from cifar_dist.errors import EnvironmentFault
    from cifar_dist.storage.files import write_json_atomic

    import faults

    run_dir = small_disk / "run"
    run_dir.mkdir()
    write_json_atomic(run_dir / "summary.json", {"test_acc": 0.5})
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0, "train_acc": 0.5}) + "\n")
    (run_dir / "config.yaml").write_text(SMOKE.read_text())
    faults.fill(run_dir)
    with pytest.raises(EnvironmentFault, match=r"summary.json: cannot write: No space left on device"):
        write_json_atomic(run_dir / "summary.json", {"test_acc": 0.9, "padding": "x" * 100_000})
    assert json.loads((run_dir / "summary.json").read_text()) == {"test_acc": 0.5}
    res = cli("report", run_dir, check=False)
    assert res.returncode == 1 and res.stderr.strip().startswith(f"cifar-dist: {run_dir / 'plots'}")
    assert "No space left on device" in res.stderr
    assert _zero_byte_files(run_dir) == [] and not list(run_dir.rglob(".tmp-*"))


def _files(run_dir) -> dict:
    """Every file of a run directory but its lock: bytes and modification time."""
    return {
        p.relative_to(run_dir): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.mark.parametrize(
    "how, overrides, step",
    [
        ("train.max_steps", (), 48),  # the reference run: 48 steps, inside epoch 2
        ("train.epochs", ("data.synthetic_train=512", "train.epochs=1"), 8),
        ("eval.stop_at_target", ("data.synthetic_train=512", "eval.target_acc=0.0001", "eval.stop_at_target=true"), 8),
    ],
)
def test_a_finished_run_resumed_stays_as_it_is(reference, tmp_path, how, overrides, step):
    """`--resume` on a run that has finished (what slurm/train.sh does whenever its job runs
    again) says so and exits 0; no file of the run is written again, no step is trained."""
    import shutil

    out = tmp_path / "run"
    if overrides:
        cli("train", "--config", SMOKE, "--out", out, *REF_ARGS_NO_STEPS, *overrides)
    else:
        shutil.copytree(reference, out)
    before = _files(out)
    res = cli("train", "--out", out, "--resume")
    reason = "eval.target_acc reached" if how == "eval.stop_at_target" else "finished"
    assert res.stdout.strip().splitlines()[-1] == f"{out}: already finished ({reason}, step {step}); nothing to do"
    assert _files(out) == before and summary(out)["steps"] == step


@pytest.mark.parametrize("fault, code", [("killend", -signal.SIGKILL), ("termend", 0), ("intend", 0), ("intend2", 130)])
def test_a_stop_after_the_last_checkpoint_ends_with_the_uninterrupted_runs_results(reference, tmp_path, fault, code):
    """A signal once training has ended (the last checkpoint written, the final evaluation
    done, the results not yet written). SIGTERM (a scheduler preempting) or one Ctrl-C: the
    results are written all the same, exit 0, not marked PREEMPTED. SIGKILL, or Ctrl-C twice:
    no results; `--resume` then trains no step and writes the uninterrupted run's results."""
    out = tmp_path / "run"
    res = cli("train", "--config", SMOKE, "--out", out, *STEPS, FAULT_ARG, env=fault_env(f"{fault}@0"), check=False)
    assert res.returncode == code, res.stderr[-3000:]
    assert not (out / "PREEMPTED").exists() and _checkpoint_steps(out)[-1] == 48
    if code == 0:
        name = "SIGTERM" if fault == "termend" else "SIGINT"
        assert f"cifar-dist: {name}: training has ended; writing the results first" in res.stderr
    else:
        assert not (out / "summary.json").exists()
        if fault == "intend2":
            assert res.stderr.strip().splitlines()[-1] == (
                f"cifar-dist: interrupted; newest checkpoint step_00000048 kept, resume with: "
                f"cifar-dist train --out {out} --resume"
            )
        res = cli("train", "--out", out, "--resume", env=fault_env(""))
        assert "training ended at step 48 (finished); writing its results" in res.stdout
    assert (reference / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    ours, theirs = summary(out), summary(reference)
    assert (ours["steps"], ours["test_acc"], ours["test_loss"]) == (48, theirs["test_acc"], theirs["test_loss"])
    assert [r["train_loss"] for r in json_rows(out)] == [r["train_loss"] for r in json_rows(reference)]


def json_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
