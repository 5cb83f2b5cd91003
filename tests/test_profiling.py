"""Profiling: the named ranges cost nothing when off; a window writes a trace that parses and
holds the ranges, an ops table and a summary; `run.profile` in a run of 1 and 2 processes (a
trace per rank), a resumed run past the window, and `cifar-dist bench --profile`."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch

from conftest import BIN, REPO, SMOKE, cli, free_port, rewind, run, torchrun
from helpers import TINY_BENCH

RUN = ["--config", SMOKE, "data.synthetic_train=512", "run.progress=false", "run.plots=false"]
SUMMARY_KEYS = {"step_ms", "ranges", "device_ms", "memory_snapshot"}


def check_window(folder, ranks=(0,), ranges=None) -> dict:
    """The files of a window in ``folder``: each rank's trace (gzipped JSON holding the named
    ranges) and ops table, and the summary with every rank's figures. Returns the summary."""
    from cifar_dist.trainer.profiling import RANGES

    for r in ranks:
        with gzip.open(folder / f"rank{r}.pt.trace.json.gz", "rt") as f:
            names = {e.get("name") for e in json.load(f)["traceEvents"]}
        assert set(ranges or RANGES) <= names, (r, sorted(n for n in names if n and not n.startswith("aten::")))
        table = (folder / f"ops_rank{r}.txt").read_text()
        assert "Self CPU" in table and len(table.splitlines()) > 5
    summary = json.loads((folder / "profile_summary.json").read_text())
    assert summary["world_size"] == len(ranks) and set(summary["ranks"]) == {str(r) for r in ranks}
    for figures in summary["ranks"].values():
        assert SUMMARY_KEYS <= set(figures), SUMMARY_KEYS - set(figures)
        assert figures["step_ms"] > 0 and figures["device_ms"] == 0  # no device time on a CPU
        shares = [figures["ranges"][n]["share"] for n in ranges or RANGES]
        assert all(s > 0 for s in shares) and sum(shares) <= 1.0 + 1e-6, shares
        assert figures["memory_snapshot"].startswith("none: the device is cpu")
    return summary


def test_the_ranges_are_one_shared_no_op_when_no_window_records():
    from cifar_dist.trainer import profiling

    assert profiling.span("forward+loss") is profiling.span("backward")
    assert not torch.autograd._profiler_enabled()
    batches = [[1], [2], [3]]
    assert list(profiling.data_waits(batches)) == batches


def test_a_window_writes_a_trace_with_the_ranges_an_ops_table_and_a_summary(tmp_path):
    from cifar_dist.trainer.profiling import Window, profile_steps, span

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(batch):
        x, y = batch
        with span("forward+loss"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        with span("backward"):
            loss.backward()
        with span("optimizer"):
            opt.step()
            opt.zero_grad()

    def batch():
        return torch.randn(16, 32), torch.randint(0, 10, (16,))

    folder = profile_steps(step, batch, tmp_path, "unit", 2, torch.device("cpu"))
    assert folder == tmp_path / "profile" / "unit"
    summary = check_window(folder, ranges=("data", "forward+loss", "backward", "optimizer"))
    assert summary["name"] == "unit" and summary["steps"] == 2
    assert not torch.autograd._profiler_enabled()
    # a window that fails writes nothing and leaves no profiler running
    window = Window(tmp_path, "failed", 2, torch.device("cpu"))
    window.start()
    step(batch())
    window.close(failed=True)
    assert not any((tmp_path / "profile" / "failed").iterdir()) and not torch.autograd._profiler_enabled()


@pytest.mark.parametrize(
    "first, last, line",
    [
        (5, 20, "run.profile: steps 5-7 (warm-up 4) are behind this run, which starts at step 5: not profiled"),
        (0, 4, "run.profile: steps 5-7 are past the run's last step 3: not profiled"),
    ],
)
def test_a_run_that_does_not_reach_the_window_says_so_and_does_not_profile(tmp_path, capsys, first, last, line):
    from cifar_dist.config.schema import ProfileConfig
    from cifar_dist.trainer.profiling import RunProfile

    profile = RunProfile(ProfileConfig(start_step=5, steps=3), tmp_path, torch.device("cpu"), first, last)
    with profile:
        for done in range(first + 1, last + 1):
            profile.after_step(done)
    assert profile.window is None and not (tmp_path / "profile").exists()
    assert capsys.readouterr().out.strip() == line


@pytest.mark.slow
def test_run_profile_in_one_process_and_a_resume_past_the_window(tmp_path):
    out = tmp_path / "run"
    res = cli("train", "--out", out, *RUN, "train.max_steps=8", "checkpoint.every_steps=4", "run.profile.start_step=2")
    folder = out / "profile" / "train"
    assert f"profile of steps 2-4: {folder} " in res.stdout
    summary = check_window(folder)
    assert summary["first_step"] == 2 and summary["steps"] == 3 and summary["device"] == "cpu"
    assert sorted(p.name for p in folder.iterdir()) == [
        "ops_rank0.txt",
        "profile_summary.json",
        "rank0.pt.trace.json.gz",
    ]
    # resumed at step 4, past the warm-up step 1: no profile
    resumed = rewind(out, tmp_path / "resumed", step=4)
    shutil.rmtree(resumed / "profile")
    res = cli("train", "--out", resumed, "--resume", *RUN, "train.max_steps=8", "run.profile.start_step=2")
    assert "run.profile: steps 2-4 (warm-up 1) are behind this run, which starts at step 4: not profiled" in res.stdout
    assert not (resumed / "profile").exists()


@pytest.mark.slow
def test_run_profile_in_two_processes_writes_a_trace_per_rank(tmp_path):
    out = tmp_path / "run"
    res = torchrun(2, "--out", out, *RUN, "train.max_steps=4", "run.profile.start_step=1", "run.profile.steps=2")
    folder = out / "profile" / "train"
    assert res.stdout.count("profile of steps 1-2:") == 1  # rank 0 alone says where
    assert "gpuGetDeviceCount" not in res.stderr and "USDT:" not in res.stderr, res.stderr[-3000:]  # kineto, quiet
    check_window(folder, ranks=(0, 1))


@pytest.mark.slow
def test_bench_profile_profiles_each_row_after_its_timing(tmp_path):
    out = tmp_path / "bench"
    bench = ["--config", SMOKE, "--out", out, "--no-baseline", "--batch-sizes", "16,32"]
    res = cli("bench", *bench, "--profile", *TINY_BENCH)
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["profile"] for r in rows] == [
        "profile/eager_fp32_NCHW_b16_synthetic",
        "profile/eager_fp32_NCHW_b32_synthetic",
    ]
    for r in rows:
        summary = check_window(out / r["profile"])
        assert summary["steps"] == 3 and summary["first_step"] is None
    assert f"profiles (one folder per row, a trace per rank): {out / 'profile'}" in res.stdout


@pytest.mark.slow
def test_bench_profile_in_two_processes_writes_a_trace_per_rank(tmp_path):
    out = tmp_path / "bench"
    launch = [BIN / "accelerate", "launch", "--config_file", REPO / "launch" / "cpu.yaml", "--num_processes", "2"]
    bench = ["-m", "cifar_dist.bench", "--config", SMOKE, "--out", out, "--no-baseline", "--batch-sizes", "32"]
    run([*launch, "--main_process_port", free_port(), *bench, "--profile", *TINY_BENCH])
    (row,) = json.loads((out / "bench.json").read_text())["rows"]
    check_window(out / row["profile"], ranks=(0, 1))
