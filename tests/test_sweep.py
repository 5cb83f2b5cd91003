"""`cifar-dist sweep` and `cifar-dist compare` on real runs: members equal to runs made by hand,
failures recorded while the others finish, resumption after a kill, parallel members."""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import pytest

from conftest import SMOKE, cli, cli_here, kill_group, run

pytestmark = pytest.mark.slow
# 40 steps of the smoke model, checkpoints every 10: a member runs long enough to be killed mid-way
ARGS = [
    "data.synthetic_train=1024",
    "data.synthetic_test=256",
    "train.max_steps=40",
    "checkpoint.every_steps=10",
    "run.plots=false",
    "run.trackers=[]",
]
GRID = ["train.lr=0.1,0.2"]
NAMES = ["lr=0.1-seed=0", "lr=0.1-seed=1", "lr=0.2-seed=0", "lr=0.2-seed=1"]


def sweep_command(out, *extra) -> list:
    """`cifar-dist sweep` of the seeds and GRID into ``out`` (``extra``: options and overrides)."""
    return [
        sys.executable,
        "-m",
        "cifar_dist.cli",
        "sweep",
        "--config",
        SMOKE,
        "--seeds",
        "2",
        *GRID,
        "--out",
        out,
        *ARGS,
        *extra,
    ]


def sweep(out, *extra, check=True, timeout=900):
    return run(sweep_command(out, *extra), check=check, timeout=timeout)


def parallel_sweep(out, *extra) -> list:
    """The command of a --parallel 2 sweep of the seeds and GRID into ``out``."""
    return sweep_command(out, "--parallel", "2", *extra)


def weights(run_dir) -> bytes:
    return (run_dir / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps") / "sequential"
    res = sweep(out)
    return out, res


def test_members_are_the_runs_a_user_would_make_by_hand(sequential, tmp_path):
    out, res = sequential
    state = json.loads((out / "sweep.json").read_text())
    assert [m["name"] for m in state["members"]] == NAMES and all(m["state"] == "done" for m in state["members"])
    assert "4 of 4 members done, 0 failed" in res.stdout
    for name, (lr, seed) in zip(NAMES, [(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)]):
        by_hand = tmp_path / name
        cli(
            "train",
            "--config",
            SMOKE,
            "--out",
            by_hand,
            *ARGS,
            f"train.lr={lr}",
            f"run.seed={seed}",
            "run.progress=false",
        )
        assert weights(by_hand) == weights(out / name), name


def test_compare_reports_each_configuration_with_its_statistics(sequential):
    out, _ = sequential
    res = cli_here("compare", out)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "compare.json").read_text())
    assert [c["label"] for c in report["configurations"]] == ["train.lr=0.1", "train.lr=0.2"]
    for conf, names in zip(report["configurations"], (NAMES[:2], NAMES[2:])):
        accs = [100 * json.loads((out / n / "summary.json").read_text())["test_acc"] for n in names]
        assert conf["n"] == 2
        assert conf["test_acc_pct"]["mean"] == pytest.approx(np.mean(accs))
        assert conf["test_acc_pct"]["std"] == pytest.approx(np.std(accs, ddof=1))
        assert conf["test_acc_pct"]["std"] == pytest.approx(statistics.stdev(accs))
    assert len(report["pairs"]) == 1 and report["pairs"][0]["p_value"] is not None
    assert "Data: synthetic data." in (out / "compare.md").read_text()  # every accuracy names its data
    assert (out / "compare.png").stat().st_size > 1000


def test_a_failed_member_is_recorded_while_the_others_finish(sequential, tmp_path):
    out = tmp_path / "failing"
    res = run(
        [sys.executable, "-m", "cifar_dist.cli", "sweep", "--config", SMOKE, "train.lr=0.1,nope", "--out", out, *ARGS],
        check=False,
    )
    assert res.returncode == 1
    members = {m["name"]: m for m in json.loads((out / "sweep.json").read_text())["members"]}
    assert members["lr=0.1-seed=0"]["state"] == "done"
    failed = members["lr=nope-seed=0"]
    assert failed["state"] == "failed" and failed["exit_code"] == 2
    assert failed["error"] == "cifar-dist: command line: train.lr: expected a number, got 'nope'"
    assert "failed: lr=nope-seed=0 (exit 2)" in res.stdout
    assert weights(out / "lr=0.1-seed=0") == weights(sequential[0] / "lr=0.1-seed=0")


def test_a_killed_parallel_sweep_resumes_to_the_sequential_results(sequential, spawn, tmp_path):
    """--parallel 2 on CPU (the smoke recipe fixes run.threads=1), killed while members are
    half-way: the same command again skips what is done and resumes the rest."""
    out = tmp_path / "parallel"
    cmd = parallel_sweep(out)
    proc = spawn(cmd)
    deadline = time.time() + 600
    while not any(
        (out / n / "checkpoints" / "step_00000010").is_dir() and not (out / n / "summary.json").exists() for n in NAMES
    ):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    kill_group(proc)
    interrupted = [n for n in NAMES if not (out / n / "summary.json").exists()]
    assert interrupted  # at least one member was cut off mid-way
    res = run(cmd)
    assert "4 of 4 members done, 0 failed" in res.stdout
    for name in NAMES:
        assert weights(out / name) == weights(sequential[0] / name), name
    logs = "".join((out / "logs" / f"{n}.log").read_text() for n in interrupted)
    assert "resuming from" in logs


def test_plan_only_writes_the_slurm_array_and_refuses_a_different_sweep_in_the_same_place(tmp_path):
    out = tmp_path / "planned"
    res = cli_here(
        "sweep",
        "--config",
        SMOKE,
        "--seeds",
        "0,5",
        "model.widths=[8,16],[16,32]",
        "model.blocks=[1,1]",
        "--out",
        out,
        "--plan-only",
    )
    assert res.returncode == 0 and "sbatch --array=0-3 slurm/sweep.sh" in res.stdout
    args = (out / "array" / "3.args").read_text().splitlines()
    assert args[0] == str(SMOKE) and "model.widths=[16,32]" in args and "run.seed=5" in args
    assert args[-1] == f"run.out_dir={(out / 'widths=16,32-seed=5').resolve()}"
    res = cli_here("sweep", "--config", SMOKE, "--seeds", "3", "--out", out, "--plan-only")
    assert res.returncode == 2 and "holds a different sweep" in res.stderr


def test_a_sweep_killed_with_sigkill_leaves_no_member_training_and_its_rerun_finishes(sequential, spawn, tmp_path):
    """SIGKILL to a --parallel 2 sweep whose members hold at step 15: the members, in sessions
    of their own, get SIGTERM as their parent dies, checkpoint and exit (no orphan trains on);
    the same command run again at once waits for any member still stopping instead of calling
    it failed, and finishes with the sequential sweep's weights."""
    import signal

    import psutil

    from conftest import FAULT_ARG, fault_env

    out = tmp_path / "killed"
    cmd = parallel_sweep(out, FAULT_ARG)
    proc = spawn(cmd, env=fault_env("wait@15"))
    deadline = time.time() + 600
    while sum("waiting for a stop request" in p.read_text() for p in (out / "logs").glob("*.log")) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    members = [c for c in psutil.Process(proc.pid).children() if "cifar_dist.train" in " ".join(c.cmdline())]
    assert len(members) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    res = run(cmd, env=fault_env(""))  # at once: the old members may still be writing their checkpoints
    assert "4 of 4 members done, 0 failed" in res.stdout, res.stdout
    assert not any(m.is_running() and m.status() != psutil.STATUS_ZOMBIE for m in members)
    for name in NAMES:
        assert weights(out / name) == weights(sequential[0] / name), name


def test_sigterm_to_a_parallel_sweep_stops_its_members_with_a_checkpoint_and_a_rerun_finishes(
    sequential, spawn, tmp_path
):
    """Both members of a --parallel 2 sweep hold at step 15 (tests/faults.py); SIGTERM to the sweep
    alone: it forwards the signal, each member checkpoints at its next control read and exits,
    the sweep exits 143 leaving no process behind, and the same command again finishes with the
    sequential sweep's weights."""
    import signal

    import psutil

    from conftest import FAULT_ARG, fault_env

    out = tmp_path / "stopped"
    cmd = parallel_sweep(out, FAULT_ARG)
    proc = spawn(cmd, env=fault_env("wait@15"))
    deadline = time.time() + 600

    def holding() -> int:
        return sum("waiting for a stop request" in p.read_text() for p in (out / "logs").glob("*.log"))

    while holding() < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    members = [c for c in psutil.Process(proc.pid).children() if "cifar_dist.train" in " ".join(c.cmdline())]
    assert len(members) == 2
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stdout
    assert "stopped by SIGTERM" in stdout and "run the same command again" in stdout
    assert not any(m.is_running() and m.status() != psutil.STATUS_ZOMBIE for m in members)
    state = {m["name"]: m for m in json.loads((out / "sweep.json").read_text())["members"]}
    # each held at step 15 and stopped at its next control read: the end of epoch 1 (16 steps)
    stopped = [n for n, m in state.items() if (out / n / "checkpoints" / "step_00000016").is_dir()]
    assert len(stopped) == 2 and all(state[n]["state"] == "pending" for n in stopped)
    res = run(cmd, env=fault_env(""))
    assert "4 of 4 members done, 0 failed" in res.stdout
    for name in NAMES:
        assert weights(out / name) == weights(sequential[0] / name), name
