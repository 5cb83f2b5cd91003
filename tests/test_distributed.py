"""One train.py under python, torchrun, accelerate launch and DeepSpeed: the same result
for any number of processes (real launchers, several CPU processes over gloo)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import (
    FAULT_ARG,
    REF_ARGS,
    REPO,
    SMOKE,
    accelerate_launch,
    assert_refused_by_its_ranks,
    base_env,
    cli,
    fault_env,
    load_weights,
    max_diff,
    rewind,
    summary,
    torchrun,
)

# The shared reference run's settings (conftest.REF_ARGS): 48 steps, checkpoints at 12, 24,
# 32, 36 and 48; the resume tests restart from 36, in epoch 2 (see conftest.rewind).
STEPS = REF_ARGS[2:]
TOL = 1e-4  # the bound the docs promise; exact_reduce makes the measured difference 0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference):
    """The reference run with 1 process (python), 2 (torchrun) and 4 (accelerate launch)."""
    base = tmp_path_factory.mktemp("invariance")
    (base / "p1").symlink_to(reference)
    res = torchrun(2, "--config", SMOKE, "--out", base / "p2", *STEPS, env=base_env(PYTHONWARNINGS="default"))
    (base / "p2.stderr").write_text(res.stderr)
    accelerate_launch("cpu.yaml", 4, "--config", SMOKE, "--out", base / "p4", *STEPS)
    return base


@pytest.mark.timeout(600)  # pays for the runs fixture: a 2- and a 4-process launch
def test_weights_and_accuracy_do_not_depend_on_the_process_count(runs):
    w1 = load_weights(runs / "p1")
    for other in ("p2", "p4"):
        diff = max_diff(w1, load_weights(runs / other))
        print(f"1 vs {other[1:]} processes: max |dw| = {diff:.3g}")
        assert diff <= TOL
        assert summary(runs / other)["test_acc"] == summary(runs / "p1")["test_acc"]
        assert summary(runs / other)["world_size"] == int(other[1:])
        assert summary(runs / other)["steps"] == 48


def test_ddp_warns_nothing_about_its_buffer_argument(runs):
    """PyTorch 2.13 deprecated DDP's broadcast_buffers; cifar_dist sets the current property
    instead, so no rank prints the FutureWarning (the run had Python's warnings on)."""
    stderr = (runs / "p2.stderr").read_text()
    assert "broadcast_buffers" not in stderr, stderr[-3000:]


def test_deepspeed_with_exact_reduce_is_refused_in_one_line_before_any_set_up(tmp_path):
    """Every rank refuses before torch is imported and exits 2; the launcher exits 1 (torchrun and
    accelerate launch do for any failed worker) and its closing report names our line as the cause.
    A rank still starting when the first one exits is stopped by the launcher before it prints."""
    pytest.importorskip("deepspeed")
    res = accelerate_launch(
        "deepspeed_zero2.yaml",
        2,
        "--config",
        SMOKE,
        "--out",
        tmp_path / "ds",
        *STEPS,
        module=True,
        check=False,
        timeout=300,
    )
    assert res.returncode != 0
    line = (
        "train.exact_reduce: DeepSpeed reduces gradients itself; set train.exact_reduce=false to train with DeepSpeed"
    )
    assert_refused_by_its_ranks(res.stderr, line)
    assert not (tmp_path / "ds").exists()


def test_accelerate_launch_with_one_process_is_the_single_process_run(reference, tmp_path):
    """`accelerate launch --num_processes 1` (and a one-node Slurm job) wraps the model in DDP
    for a world of one, where Accelerate's no_sync does nothing: the exact path once summed its
    chunk gradients through DDP's buckets and trained a different, worse run."""
    accelerate_launch("cpu.yaml", 1, "--config", SMOKE, "--out", tmp_path / "one", *STEPS, module=True)
    assert (reference / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()


def test_gradient_accumulation_matches_more_processes(runs, tmp_path):
    cli("train", "--config", SMOKE, "--out", tmp_path / "accum", *STEPS, "train.accum_steps=2")
    diff = max_diff(load_weights(runs / "p2"), load_weights(tmp_path / "accum"))
    print(f"accum_steps=2 on 1 process vs 2 processes: max |dw| = {diff:.3g}")
    assert diff <= TOL


def test_two_process_run_stopped_and_resumed_matches_uninterrupted(runs, tmp_path):
    out = rewind(runs / "p2", tmp_path / "resumed", step=36)
    res = torchrun(2, "--config", SMOKE, "--out", out, "--resume", *STEPS)
    assert "resuming from" in res.stdout and "step 36" in res.stdout
    assert summary(out)["steps"] == 48
    assert (runs / "p2" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


ROW_KEYS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr")


def _rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r.get(k) for k in ROW_KEYS} for r in rows]


@pytest.mark.parametrize("source, processes", [("p1", 2), ("p2", 1), ("p4", 2)])
def test_a_resume_on_another_process_count_is_bit_identical_with_exact_reduce(runs, tmp_path, source, processes):
    """Stopped at step 36 (mid-epoch 2) with 1, 2 or 4 processes, resumed with 2, 1 or 2: the
    final weights are byte-identical to the uninterrupted run's, and so is every metrics row (the
    interrupted epoch's sums were reduced over all ranks before they were saved)."""
    out = rewind(runs / source, tmp_path / "resumed", step=36)
    saved = json.loads((out / "checkpoints" / "step_00000036" / "state.json").read_text())
    assert saved["world_size"] == int(source[1:]) and saved["partial"]["count"] == 4 * 64
    args = ["--out", out, "--resume"]
    res = cli("train", *args) if processes == 1 else torchrun(processes, *args)
    assert (
        f"resuming a run of {source[1:]} processes on {processes}: train.exact_reduce keeps it bit-identical"
        in res.stdout
    ), res.stdout[-2000:]
    assert (runs / "p1" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert _rows(out) == _rows(runs / source) == _rows(runs / "p1")
    assert summary(out)["segments"] == [
        {"world_size": int(source[1:]), "from_step": 0},
        {"world_size": processes, "from_step": 36},
    ]


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """The same 48 steps with DDP's own all-reduce and with DeepSpeed ZeRO-2, 2 processes each."""
    pytest.importorskip("deepspeed")
    base = tmp_path_factory.mktemp("deepspeed")
    args = ["--config", SMOKE, "train.exact_reduce=false", *STEPS]
    torchrun(2, "--out", base / "ddp", *args)
    res = accelerate_launch("deepspeed_zero2.yaml", 2, "--out", base / "ds", *args, module=True)
    return base, res


@pytest.mark.timeout(600)  # pays for the deepspeed_runs fixture
def test_deepspeed_zero2_matches_ddp(deepspeed_runs):
    base, res = deepspeed_runs
    assert "on 2 x cpu, DeepSpeed ZeRO-2," in res.stdout  # the banner says the mode in words
    diff = max_diff(load_weights(base / "ddp"), load_weights(base / "ds"))
    print(f"DeepSpeed ZeRO-2 vs DDP, 2 processes, 48 steps: max |dw| = {diff:.3g}")
    assert diff <= TOL
    assert summary(base / "ds")["test_acc"] == summary(base / "ddp")["test_acc"]


def test_without_exact_reduce_a_changed_process_count_is_warned_and_recorded(deepspeed_runs, tmp_path):
    """DDP's own all-reduce over 2 processes, resumed on 1: allowed, with one line saying what
    changes (the summation order; the BatchNorm batch is fixed by model.bn_group), and recorded."""
    base, _ = deepspeed_runs
    out = rewind(base / "ddp", tmp_path / "resumed", step=36)
    res = cli("train", "--out", out, "--resume")
    warning = [ln for ln in res.stderr.splitlines() if "resuming a run of 2 processes on 1" in ln]
    assert warning == [
        "cifar-dist: warning: resuming a run of 2 processes on 1: without train.exact_reduce "
        "gradients are summed in another order; it goes on, no longer bit-identical to an "
        "uninterrupted run (summary.json's segments record it)"
    ], res.stderr[-2000:]
    assert [s["world_size"] for s in summary(out)["segments"]] == [2, 1]
    diff = max_diff(load_weights(base / "ddp"), load_weights(out))
    print(f"2 processes, resumed at step 36 on 1, without exact_reduce: max |dw| = {diff:.3g} after 48 steps")
    assert diff <= 1e-2  # close to the uninterrupted run, not equal (measured: 5.4e-4)


def test_deepspeed_checkpoint_and_resume(deepspeed_runs, tmp_path):
    base, _ = deepspeed_runs
    out = rewind(base / "ds", tmp_path / "ds", step=36)
    res = accelerate_launch(
        "deepspeed_zero2.yaml", 2, "--out", out, "--resume", "--config", SMOKE, "train.exact_reduce=false", *STEPS
    )
    assert "resuming from" in res.stdout and "step 36" in res.stdout
    assert max_diff(load_weights(base / "ds"), load_weights(out)) == 0


def test_deepspeed_bf16_matches_ddp_bf16_to_bf16_rounding(tmp_path):
    """DeepSpeed's bf16 engine holds the weights themselves in bf16 and runs no autocast
    (the inputs are cast for it); DDP autocasts with fp32 weights. After 4 steps no weight
    is further from DDP's than one bf16 step at the model's largest weight (the BatchNorm
    scales, about 1); later the two drift apart like any runs that round differently."""
    pytest.importorskip("deepspeed")
    args = [
        "--config",
        SMOKE,
        "train.exact_reduce=false",
        "run.precision=bf16",
        "train.max_steps=4",
        "data.synthetic_train=2048",
        "run.progress=false",
        "run.plots=false",
    ]
    torchrun(2, "--out", tmp_path / "ddp", *args)
    accelerate_launch("deepspeed_zero2.yaml", 2, "--out", tmp_path / "ds", *args)
    ddp, ds = load_weights(tmp_path / "ddp"), load_weights(tmp_path / "ds")
    floats = [k for k, w in ddp.items() if w.is_floating_point()]
    largest = max(ddp[k].double().abs().max().item() for k in floats)
    diff = max_diff({k: ddp[k] for k in floats}, {k: ds[k] for k in floats})
    print(
        f"DeepSpeed bf16 vs DDP bf16, 2 processes, 4 steps: max |dw| = {diff:.3g} "
        f"(one bf16 step at the largest weight, {largest:.3g}: {2**-7 * largest:.3g})"
    )
    assert diff <= 2**-7 * largest
    assert summary(tmp_path / "ds")["precision"] == "bf16"


@pytest.mark.timeout(900)  # a cold compile took 504 s on a slow day
def test_compile_on_cpu_with_no_recompiles_after_warmup(tmp_path):
    out = tmp_path / "compiled"
    cli(
        "train",
        "--config",
        SMOKE,
        "--out",
        out,
        "data.synthetic_train=256",
        "data.synthetic_test=256",
        "run.compile=true",
        "run.plots=false",
        "run.progress=false",
        "train.exact_reduce=false",
        "model.bn_group=0",
        timeout=1800,
    )
    s = summary(out)
    assert s["epochs"] == 2 and s["compiled_graphs"] >= 2  # train and eval graphs
    assert s["recompiles_after_warmup"] == 0


@pytest.mark.timeout(900)  # two cold compiles side by side
def test_compiled_ddp_matches_eager_ddp_with_no_recompiles_after_warmup(tmp_path):
    """2 processes (gloo): the DDP-wrapped module is compiled (graphs split at DDP's
    buckets), evaluation has its own compiled module. Two epochs of one step each match the
    eager run to float tolerance (compiled kernels sum in another order, and early training
    amplifies that: one process, compiled vs eager, differed by 1.4e-6 after one step,
    8e-5 after two, 7e-3 after eight), and nothing compiles after the first epoch."""
    args = [
        "--config",
        SMOKE,
        "data.synthetic_train=64",
        "data.synthetic_test=256",
        "train.exact_reduce=false",
        "model.bn_group=0",
        "run.plots=false",
        "run.progress=false",
    ]
    torchrun(2, "--out", tmp_path / "eager", *args)
    torchrun(2, "--out", tmp_path / "compiled", *args, "run.compile=true", timeout=900)
    s = summary(tmp_path / "compiled")
    assert s["epochs"] == 2 and s["world_size"] == 2 and s["compiled_graphs"] >= 2
    assert s["recompiles_after_warmup"] == 0
    diff = max_diff(load_weights(tmp_path / "eager"), load_weights(tmp_path / "compiled"))
    print(f"compiled vs eager DDP, 2 processes, 2 steps: max |dw| = {diff:.3g}")
    assert diff <= 1e-3


def test_channels_last_bf16_on_cpu(tmp_path):
    out = tmp_path / "bf16"
    cli(
        "train",
        "--config",
        SMOKE,
        "--out",
        out,
        "run.precision=bf16",
        "run.channels_last=true",
        "train.max_steps=20",
        "run.progress=false",
        "run.plots=false",
    )
    s = summary(out)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert s["steps"] == 20 and s["precision"] == "bf16"
    assert math.isfinite(s["test_loss"]) and row["train_loss"] < math.log(10)  # below chance level


def test_processes_that_do_not_know_each_other_are_refused(spawn, tmp_path):
    """The silent trap: N processes each believing they are rank 0 of 1 (here, what
    `srun -n 2 python train.py` gives: Slurm's variables and no launcher)."""
    procs = []
    for rank in range(2):
        env = base_env(SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=rank, SLURM_NTASKS=2)
        entry = [REPO / "cifar_dist" / "train.py"] if rank == 0 else ["-m", "cifar_dist.train"]  # both forms
        procs.append(
            spawn(
                [sys.executable, *entry, "--config", SMOKE, "--out", tmp_path / f"r{rank}", "run.progress=false"],
                env=env,
            )
        )
    for rank, p in enumerate(procs):
        _, err = p.communicate(timeout=280)
        assert p.returncode == 2
        assert f"rank {rank}: the launcher started 2 processes but each one sees a world of 1" in err
        assert not (tmp_path / f"r{rank}" / "model.safetensors").exists()


def test_failure_on_one_rank_is_reported_with_its_rank(tmp_path):
    res = torchrun(
        2, "--config", SMOKE, "--out", tmp_path / "f", *STEPS, FAULT_ARG, env=fault_env("raise@3:1"), check=False
    )
    assert res.returncode != 0
    assert "cifar-dist: rank 1: crashed: RuntimeError: injected fault at step 3" in res.stderr


def test_sync_bn_is_refused_on_cpu(tmp_path):
    res = cli("train", "--config", SMOKE, "--out", tmp_path / "s", "model.sync_bn=true", check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("cifar-dist: model.sync_bn: SyncBatchNorm only runs on GPUs")
