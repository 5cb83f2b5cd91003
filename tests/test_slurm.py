"""slurm/train.sh on a real Slurm: two emulated nodes on this host (tests/slurm_cluster.py),
one `accelerate launch` per node, gloo between them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import FAULT_ARG, REF_ARGS, REPO, SMOKE, base_env, cli_here, fault_env, load_weights, max_diff, summary
from slurm_cluster import SlurmCluster, SlurmError, unavailable

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ARGS = REF_ARGS[2:]  # the shared reference run's settings (conftest.REF_ARGS), 48 steps
# The emulated nodes have no GPUs and share this host's cores.
NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    why = unavailable()
    if why:
        pytest.skip(f"no local Slurm: {why}")
    with SlurmCluster(base=str(tmp_path_factory.mktemp("cluster"))) as c:
        yield c


def _sbatch(cluster, out_dir, *args, fault=None, nodes=NODES, **extra_env):
    env, args = (fault_env(fault, **extra_env), (*args, FAULT_ARG)) if fault else (base_env(**extra_env), args)
    return cluster.submit(
        *nodes, f"--output={out_dir}/job-%j.out", "slurm/train.sh", *args, env=cluster.client_env(**env), cwd=REPO
    )


@pytest.mark.timeout(600)
def test_two_node_job_matches_one_process(cluster, reference, tmp_path):
    job = _sbatch(cluster, tmp_path, SMOKE, "--out", tmp_path / "slurm", *ARGS)
    info = cluster.wait(job, timeout=1200)
    log = cluster.log(job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}\n{cluster.daemon_logs()}"
    assert "on 2 node(s)" in log and "1 CPU process(es) per node, 2 in all" in log
    assert summary(tmp_path / "slurm")["world_size"] == 2
    diff = max_diff(load_weights(reference), load_weights(tmp_path / "slurm"))
    print(f"sbatch --nodes=2 vs 1 process, 48 steps: max |dw| = {diff:.3g}")
    assert diff <= 1e-4


def test_a_failing_rank_ends_the_job_failed_within_a_minute(cluster, tmp_path):
    job = _sbatch(cluster, tmp_path, SMOKE, "--out", tmp_path / "fail", *ARGS, fault="raise@3:1")
    deadline = time.time() + 900
    while "injected fault" not in cluster.log(job):
        if time.time() > deadline or cluster.state(job) in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.5)
    crashed_at = time.time()
    try:
        info = cluster.wait(job, timeout=60, poll=0.5)
    except SlurmError as e:
        pytest.fail(f"the job did not end within 60 s of the crash: {e}")
    log = cluster.log(job)
    print(f"job ended {info['JobState']} {time.time() - crashed_at:.0f} s after the crash")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert "cifar-dist: rank 1: crashed: RuntimeError: injected fault at step 3" in log


@pytest.mark.timeout(600)
def test_preempted_job_checkpoints_requeues_and_ends_with_the_same_weights(cluster, reference, tmp_path):
    """USR1 to the job's steps mid-run (what --signal=USR1@120 sends before the time limit)."""
    out = tmp_path / "preempted"
    # Both ranks hold at step 17 until the signal arrives (tests/faults.py: wait@17).
    job = _sbatch(cluster, tmp_path, SMOKE, "--out", out, *ARGS, fault="wait@17")
    deadline = time.time() + 900
    while cluster.log(job).count("waiting for a stop request at step 17") < 2:
        assert time.time() < deadline, cluster.log(job)[-4000:]
        assert cluster.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), cluster.log(job)[-4000:]
        time.sleep(0.5)
    cluster.cmd("scancel", "--signal=USR1", job)
    info = cluster.wait(job, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=1500)
    log = cluster.log(job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-6000:]}"
    assert int(info.get("Restarts", 0)) >= 1, log[-4000:]
    assert "requeueing job" in log and "resuming from" in log
    assert summary(out)["steps"] == 48
    assert (reference / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.timeout(600)
def test_a_job_stopped_on_two_nodes_resumes_on_one_with_the_same_weights(cluster, reference, tmp_path):
    """Preempted on 2 nodes (not requeued: CIFAR_DIST_REQUEUE=0), submitted again with --nodes=1:
    the run continues on 1 process and, with exact_reduce, ends byte-identical to 1 process."""
    out = tmp_path / "elastic"
    job = _sbatch(cluster, tmp_path, SMOKE, "--out", out, *ARGS, fault="wait@17", CIFAR_DIST_REQUEUE="0")
    deadline = time.time() + 900
    while cluster.log(job).count("waiting for a stop request at step 17") < 2:
        assert time.time() < deadline and cluster.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), cluster.log(job)[
            -4000:
        ]
        time.sleep(0.5)
    cluster.cmd("scancel", "--signal=USR1", job)
    info = cluster.wait(job, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=900)
    assert info["JobState"] == "COMPLETED" and "not requeueing" in cluster.log(job), cluster.log(job)[-4000:]
    one = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
    job = _sbatch(
        cluster,
        tmp_path,
        SMOKE,
        "--out",
        out,
        *ARGS,
        FAULT_ARG,
        nodes=one,
        FAULT_INJECT="",
        PYTHONPATH=str(REPO / "tests"),
    )
    info = cluster.wait(job, timeout=900)
    log = cluster.log(job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "resuming a run of 2 processes on 1: train.exact_reduce keeps it bit-identical" in log
    assert [s["world_size"] for s in summary(out)["segments"]] == [2, 1]
    assert (reference / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_bench_job_on_two_nodes_leaves_its_table(cluster, tmp_path):
    """slurm/bench.sh: the smoke model for a few steps on 2 processes (one per node)."""
    out = tmp_path / "bench"
    job = cluster.submit(
        *NODES,
        f"--output={tmp_path}/job-%j.out",
        "slurm/bench.sh",
        "--config",
        SMOKE,
        "--out",
        out,
        "--batch-sizes",
        "16",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--repeats",
        "1",
        env=cluster.client_env(**base_env()),
        cwd=REPO,
    )
    info = cluster.wait(job, timeout=1200)
    log = cluster.log(job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    table = (out / "bench.md").read_text()
    assert "baseline b16" in table and table in log  # the table is printed into the job's log too
    result = json.loads((out / "bench.json").read_text())
    assert result["hardware"]["world_size"] == 2
    row = next(r for r in result["rows"] if not r["baseline"])
    assert row["images_per_s_per_device"] > 0 and 0 < row["scaling_efficiency"] < 10
    assert (out / "bench.png").stat().st_size > 1000


def test_a_job_uses_the_submitting_environment_when_the_repository_has_no_venv(cluster, tmp_path):
    """A checkout without .venv (here: the repository's files linked into a fresh folder),
    submitted from an activated environment: the job finds accelerate through
    $VIRTUAL_ENV, says so in its log, and trains."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for part in ("cifar_dist", "configs", "launch", "slurm"):
        (checkout / part).symlink_to(REPO / part)
    venv = Path(sys.executable).parent.parent
    env = base_env(VIRTUAL_ENV=venv)
    env.pop("CIFAR_DIST_VENV", None)
    env.pop("CIFAR_DIST_REPO", None)
    out = tmp_path / "run"
    job = cluster.submit(
        *NODES,
        f"--output={tmp_path}/job-%j.out",
        checkout / "slurm" / "train.sh",
        SMOKE,
        "--out",
        out,
        "train.max_steps=4",
        "data.synthetic_train=512",
        "data.synthetic_test=256",
        env=cluster.client_env(**env),
        cwd=checkout,
    )
    info = cluster.wait(job, timeout=900)
    log = cluster.log(job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}"
    assert f"using {venv}/bin/accelerate (from the submitting environment (VIRTUAL_ENV))" in log
    assert summary(out)["steps"] == 4


@pytest.mark.timeout(900)
def test_a_sweep_runs_as_a_job_array_and_compare_reads_it(cluster, tmp_path):
    """`cifar-dist sweep --plan-only`, then a 3-task array of slurm/sweep.sh (one member per
    task, on one node each), then `cifar-dist compare`."""
    sweep = tmp_path / "sweep"
    res = cli_here(
        "sweep",
        "--config",
        SMOKE,
        "--seeds",
        "0,1,2",
        "--out",
        sweep,
        "--plan-only",
        "train.max_steps=6",
        "data.synthetic_train=512",
        "data.synthetic_test=256",
        "run.plots=false",
    )
    assert res.returncode == 0 and "sbatch --array=0-2 slurm/sweep.sh" in res.stdout
    cluster.submit(
        "--array=0-2",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={tmp_path}/array-%A_%a.out",
        "slurm/sweep.sh",
        sweep,
        env=cluster.client_env(**base_env()),
        cwd=REPO,
    )
    deadline = time.time() + 800
    names = [f"seed={s}" for s in range(3)]
    while not all((sweep / n / "summary.json").is_file() for n in names):
        assert time.time() < deadline, cluster.daemon_logs()[-3000:]
        time.sleep(1)
    assert [summary(sweep / n)["seed"] for n in names] == [0, 1, 2]
    res = cli_here("compare", sweep)
    report = json.loads((sweep / "compare.json").read_text())
    assert res.returncode == 0 and len(report["configurations"]) == 1 and report["configurations"][0]["n"] == 3


@pytest.mark.timeout(900)
def test_tune_workers_as_array_tasks_share_one_study(cluster, tmp_path):
    """slurm/tune.sh as a 2-task array on one tuning directory: 3 trials in all, each run once."""
    optuna = pytest.importorskip("optuna", reason="Optuna is not installed: pip install 'cifar_dist[tune]'")
    space, out = tmp_path / "space.yaml", tmp_path / "tune"
    space.write_text("train.lr: {low: 0.05, high: 0.5, log: true}\n")
    small = ["train.max_steps=6", "data.synthetic_train=512", "data.synthetic_test=256", "run.plots=false"]
    args = ["--config", SMOKE, "--space", space, "--trials", "3", "--pruner", "none", "--out", out, *small]
    cluster.submit(
        "--array=0-1", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
        f"--output={tmp_path}/tune-%A_%a.out", "slurm/tune.sh", *args,
        env=cluster.client_env(**base_env()), cwd=REPO,
    )  # fmt: skip
    deadline = time.time() + 800
    while True:
        assert time.time() < deadline, cluster.daemon_logs()[-3000:]
        if (out / "study.journal").is_file():
            storage = optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))
            )
            trials = optuna.load_study(study_name="tune", storage=storage).get_trials()
            if len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials):
                break
        time.sleep(1)
    logs = "".join(p.read_text() for p in tmp_path.glob("tune-*.out"))
    assert sorted(line.split("]")[0] for line in logs.splitlines() if line.endswith(": started")) == [
        "[trial 0", "[trial 1", "[trial 2",
    ]  # fmt: skip
