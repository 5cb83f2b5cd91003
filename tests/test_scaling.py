"""scripts/plan.py: the scaling formula by hand, its inverse, bench.json input, the printed table
and its one-line refusals."""

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_dist.errors import UserError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plan.py"
sys.path.insert(0, str(SCRIPT.parent))  # a script, not part of the package
from plan import (  # noqa: E402
    PRESETS,
    add_plan_arguments,
    allreduce_time,
    check_against_measurement,
    compute_time,
    efficiency,
    largest_efficient,
    main,
    plan_point,
    read_bench,
    run_plan,
    solve_bandwidth,
    step_time,
)

# The hand case: 1,000,000 parameters x 4 bytes = 4e6 bytes, N = 4 GPUs, 10 GB/s, 10 µs, batch 100 at 1000 img/s.
#   t_c  = 100 / 1000                                   = 0.1 s
#   t_ar = 2 * 3/4 * 4e6 / 1e10 + 2 * 3 * 1e-5 = 6e-4 + 6e-5 = 6.6e-4 s
#   step = 0.1 + 6.6e-4 = 0.10066 s, efficiency = 0.1 / 0.10066 = 0.993443...
NBYTES, N, BW, LAT, BATCH, RATE = 4e6, 4, 10e9, 10e-6, 100, 1000.0


def _parse(*argv):
    ap = argparse.ArgumentParser()
    add_plan_arguments(ap)
    return ap.parse_args(list(argv))


def test_formula_by_hand():
    assert compute_time(BATCH, RATE) == pytest.approx(0.1)
    assert allreduce_time(N, NBYTES, BW, LAT) == pytest.approx(6.6e-4)
    assert step_time(0.1, 6.6e-4) == pytest.approx(0.10066)
    assert efficiency(0.1, 6.6e-4) == pytest.approx(0.1 / 0.10066)
    assert efficiency(0.1, 6.6e-4) == pytest.approx(0.993443, abs=1e-6)


def test_overlap():
    # Hidden entirely: 2/3 x 0.1 s = 0.0667 s of backward covers the 6.6e-4 s all-reduce.
    assert efficiency(0.1, 6.6e-4, 2 / 3) == 1.0
    # Partly: at 10 MB/s, t_ar = 2 * 3/4 * 4e6 / 1e7 + 6e-5 = 0.6 + 6e-5 = 0.60006 s; overlap 0.5 hides
    # 0.5 x 0.1 = 0.05 s, so the step is 0.1 + (0.60006 - 0.05) = 0.65006 s and the efficiency 0.1 / 0.65006.
    t_ar = allreduce_time(N, NBYTES, 1e7, LAT)
    assert t_ar == pytest.approx(0.60006)
    assert step_time(0.1, t_ar, 0.5) == pytest.approx(0.65006)
    assert efficiency(0.1, t_ar, 0.5) == pytest.approx(0.1 / 0.65006)
    assert efficiency(0.1, t_ar, 0.5) > efficiency(0.1, t_ar, 0.0)


def test_one_gpu_has_no_communication():
    assert allreduce_time(1, NBYTES, BW, LAT) == 0.0
    for link in PRESETS.values():
        row = plan_point(link, 1, RATE, BATCH, NBYTES, 2 / 3)
        assert row["allreduce_ms"] == 0.0
        assert row["efficiency_no_overlap"] == row["efficiency_overlap"] == 1.0
        assert row["job_images_per_s_no_overlap"] == RATE
    assert solve_bandwidth(0.9, 0.1, 1, NBYTES, LAT) == math.inf


def test_bandwidth_solved_back_from_efficiency():
    eff = efficiency(0.1, allreduce_time(N, NBYTES, BW, LAT))
    assert solve_bandwidth(eff, 0.1, N, NBYTES, LAT) == pytest.approx(BW)
    eff = efficiency(0.1, allreduce_time(N, NBYTES, 1e7, LAT), 0.5)  # the partly hidden case above
    assert solve_bandwidth(eff, 0.1, N, NBYTES, LAT, overlap=0.5) == pytest.approx(1e7)
    # The latency alone (2 * 3 * 1 s) costs more than a 99% efficiency allows: no bandwidth explains it.
    assert solve_bandwidth(0.99, 0.1, N, NBYTES, 1.0) == math.inf


def test_check_against_measurement_round_trips():
    # 1000 img/s alone, 900 img/s per process with 2: measured 90%; the explaining bandwidth predicts it.
    r = check_against_measurement(1000.0, 900.0, 2, 1_000_000, 4, BW, LAT, batch=BATCH)
    assert r["measured_efficiency"] == pytest.approx(0.9)
    assert r["compute_s"] == pytest.approx(0.1)
    assert r["measured_loss_s"] == pytest.approx(100 / 900 - 0.1)
    # 2 processes: t_ar = 1 * 4e6 / 1e10 + 2 * 1e-5 = 4.2e-4 s, efficiency 0.1 / 0.10042
    assert r["predicted_efficiency"] == pytest.approx(0.1 / 0.10042)
    again = check_against_measurement(1000.0, 900.0, 2, 1_000_000, 4, r["explaining_bandwidth"], LAT, batch=BATCH)
    assert again["predicted_efficiency"] == pytest.approx(0.9)


def test_largest_efficient_gpu_count():
    t_c = compute_time(BATCH, RATE)
    for link in PRESETS.values():
        n = largest_efficient(link, RATE, BATCH, NBYTES, 0.0)
        assert efficiency(t_c, allreduce_time(n, NBYTES, link.bandwidth, link.latency)) >= 0.8
        if n < (link.max_gpus or 4096):
            assert efficiency(t_c, allreduce_time(n + 1, NBYTES, link.bandwidth, link.latency)) < 0.8
    assert largest_efficient(PRESETS["nvlink"], RATE, BATCH, NBYTES, 0.0) == 8  # one node, however fast


def _fake_bench(tmp_path):
    rows = [
        {
            "label": "baseline b256 (plain PyTorch loop)",
            "baseline": True,
            "images_per_s_per_device": 9000.0,
            "settings": {"batch": 256, "precision": "fp32"},
        },
        {
            "label": "eager bf16 NCHW b256 synthetic",
            "baseline": False,
            "images_per_s_per_device": 1500.0,
            "settings": {"batch": 256, "precision": "bf16"},
        },
        {
            "label": "compile bf16 channels_last b384 synthetic",
            "baseline": False,
            "images_per_s_per_device": 2500.0,
            "single_process_images_per_s": 2600.0,
            "settings": {"batch": 384, "precision": "bf16"},
        },
        {
            "label": "torch w2",
            "baseline": False,
            "images_per_s_per_device": 99000.0,  # a loader-only row
            "settings": {"loader": "torch", "workers": 2, "batch": 256},
        },
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": rows}))
    return path


def test_bench_json_gives_the_fastest_training_row(tmp_path, capsys):
    path = _fake_bench(tmp_path)
    assert read_bench(path)[:3] == (2600.0, 384, "compile bf16 channels_last b384 synthetic")
    assert run_plan(_parse("--bench", str(path), "--gpus", "2")) == 0
    out = capsys.readouterr().out
    assert "2,600 img/s at batch 384" in out and "measured" in out and "ASSUMPTION" not in out
    baseline_only = {
        "label": "baseline",
        "baseline": True,
        "images_per_s_per_device": 1.0,
        "settings": {"batch": 8, "precision": "fp32"},
    }
    (tmp_path / "empty.json").write_text(json.dumps({"rows": [baseline_only]}))
    with pytest.raises(UserError):
        read_bench(tmp_path / "empty.json")
    with pytest.raises(UserError):
        read_bench(tmp_path / "missing.json")


def test_plan_defaults_print_every_preset_and_gpu_count(tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    assert run_plan(_parse("--json", str(out_json))) == 0
    out = capsys.readouterr().out
    assert "ASSUMPTION" in out
    table = [line for line in out.splitlines() if line.startswith("| ") and "interconnect" not in line]
    for link in PRESETS.values():
        assert link.label in out
        assert sorted(int(line.split("|")[2]) for line in table if line.startswith(f"| {link.label} |")) == [
            8,
            16,
            64,
            256,
        ]
    assert "n/a" in out  # NVLink beyond one node
    assert "Rule:" in out and "Large global batches" in out
    plan = json.loads(out_json.read_text())
    assert len(plan["rows"]) == 12 and plan["batch"] == 512 and set(plan["largest_efficient"]) == set(PRESETS)


def test_plan_refuses_bad_input(tmp_path):
    """Bad numbers are refused as the arguments are read (test_cli.py has every option); a
    bench.json whose numbers no plan can use, when it is read."""
    for argv in (("--gpus", "8,x"), ("--overlap", "1.5"), ("--images-per-s", "nan")):
        with pytest.raises(SystemExit):
            _parse(*argv)
    bench = tmp_path / "bench.json"
    row = {"label": "r", "baseline": False, "images_per_s_per_device": -3.0, "settings": {"batch": 256}}
    bench.write_text(json.dumps({"hardware": {"parameters": 10, "device_type": "cuda"}, "rows": [row]}))
    with pytest.raises(UserError):
        run_plan(_parse("--bench", str(bench)))


def test_plan_takes_the_benched_models_parameters_and_device(tmp_path, capsys):
    """A bench of the CPU demo's model (78,042 parameters) on a CPU: its gradients and its device
    kind, not the paper's model on a GPU."""
    path = tmp_path / "bench.json"
    path.write_text(
        json.dumps(
            {
                "hardware": {"parameters": 78_042, "device": "AMD EPYC (2 cores)", "device_type": "cpu"},
                "rows": [
                    {
                        "label": "eager fp32 channels_last b256 synthetic",
                        "baseline": False,
                        "images_per_s_per_device": 184.0,
                        "settings": {"batch": 256, "precision": "fp32"},
                    }
                ],
            }
        )
    )
    assert run_plan(_parse("--bench", str(path), "--gpus", "2")) == 0
    out = capsys.readouterr().out
    assert "Gradients: 78,042 parameters" in out and "4,916,284" not in out
    assert "Single-CPU process throughput: 184 img/s" in out and "AMD EPYC (2 cores)" in out
    assert "Single-GPU" not in out
    (tmp_path / "bad.json").write_text(
        json.dumps(
            {"rows": [{"label": "x", "images_per_s_per_device": "fast", "settings": {"batch": 8, "precision": "fp32"}}]}
        )
    )
    with pytest.raises(UserError, match="has no positive images/s"):
        read_bench(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(UserError, match="not a bench.json"):
        read_bench(tmp_path / "list.json")


def plan_here(*args) -> tuple[int, str]:
    """``python scripts/plan.py ARGS`` in this process: its exit code and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:
            code = stop.code
    return code, err.getvalue()


def test_the_script_runs_as_a_script():
    res = subprocess.run([sys.executable, SCRIPT, "--gpus", "8"], capture_output=True, text=True, check=True)
    assert "Rule: the largest GPU count" in res.stdout


NUMBERS = {  # each numeric option, and values none of them can use
    "--images-per-s": ["0", "-5", "nan", "inf", "-inf"],
    "--batch": ["0", "-1"],
    "--params": ["0"],
    "--reduce-bytes": ["0", "-2"],
    "--gpus": ["0,2", "-1", ",", "two"],
    "--overlap": ["1.5", "-0.1", "nan"],
}


@pytest.mark.parametrize("option", list(NUMBERS))
def test_every_numeric_argument_refuses_what_no_command_can_use_in_one_line(option, tmp_path):
    """Zero, negative, NaN, infinity, a fraction where a count is meant, an empty list: one
    line naming the option and the value, exit 2, before anything runs or is written."""
    for value in NUMBERS[option]:
        code, err = plan_here(f"{option}={value}", "--json", tmp_path / "out")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (value, err)
        assert lines[0].startswith(f"cifar-dist: scripts/plan.py: argument {option}: expected ")
        assert any(repr(part) in lines[0] for part in [value, *value.split(",")])  # the value, or its bad item
        assert not (tmp_path / "out").exists()


def test_an_output_file_whose_folder_is_missing_or_that_is_a_folder_is_one_line(tmp_path):
    for path, line in [
        (
            tmp_path / "no" / "plan.json",
            f"--json {tmp_path / 'no' / 'plan.json'}: folder {tmp_path / 'no'} does not exist",
        ),
        (tmp_path, f"--json {tmp_path}: is a directory; name a file"),
    ]:
        code, err = plan_here("--json", path)
        assert code == 2 and err.strip() == f"cifar-dist: {line}"


def test_an_unknown_option_or_a_path_that_is_not_utf8_is_one_line(tmp_path):
    code, err = plan_here("--nosuch")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unrecognized arguments: --nosuch" in err, err
    bad = tmp_path / os.fsdecode(b"run\xff")
    line = f"cifar-dist: {tmp_path}/run\\udcff: the path is not valid UTF-8; choose a folder whose name is"
    code, err = plan_here("--json", bad)
    assert code == 2 and err.strip().splitlines() == [line], err
    assert sorted(os.listdir(tmp_path)) == []
