"""Time to accuracy: eval.target_acc in summary.json, and eval.stop_at_target."""

from __future__ import annotations

import json

from conftest import SMOKE, cli_here

QUICK = [
    "data.synthetic_train=512",
    "data.synthetic_test=256",
    "run.plots=false",
    "run.progress=false",
    "run.trackers=[]",
    "train.epochs=4",
]


def test_time_to_target_counts_training_time_up_to_the_first_epoch_at_the_target():
    from cifar_dist.storage.results import time_to_target

    rows = [
        {"epoch": 1, "epoch_time_s": 10.0, "test_acc": 0.5},
        {"epoch": 2, "epoch_time_s": 12.0},
        {"epoch": 3, "epoch_time_s": 11.0, "test_acc": 0.93},
        {"epoch": 4, "epoch_time_s": 9.0, "test_acc": 0.95},
    ]
    assert time_to_target(rows, 0.9) == {"target_acc": 0.9, "time_to_target_s": 33.0, "epochs_to_target": 3}
    assert time_to_target(rows, 0.99) == {"target_acc": 0.99, "time_to_target_s": None, "epochs_to_target": None}
    assert time_to_target(rows, 0.0) == {}


def test_stop_at_target_ends_the_run_at_the_first_epoch_that_reaches_it(tmp_path):
    out = tmp_path / "run"
    res = cli_here("train", "--config", SMOKE, "--out", out, *QUICK, "eval.target_acc=0.3", "eval.stop_at_target=true")
    assert res.returncode == 0, res.stderr
    assert "estimated time to finish:" in res.stdout  # timed between the control reads after steps 8 and 16
    s = json.loads((out / "summary.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reached = next(r for r in history if r["test_acc"] >= 0.3)  # epoch 3 of 4 (seeded)
    assert history[-1]["epoch"] == reached["epoch"] < 4  # stopped there
    assert s["epochs_to_target"] == reached["epoch"] and s["epochs"] == reached["epoch"]
    assert abs(s["time_to_target_s"] - sum(r["epoch_time_s"] for r in history)) < 1e-6
    # a target the run never reaches (it ends at 57.8%) is recorded as null, and the run goes on to the end
    res = cli_here(
        "train", "--config", SMOKE, "--out", tmp_path / "all", *QUICK, "eval.target_acc=0.9", "eval.stop_at_target=true"
    )
    s = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert s["epochs"] == 4 and s["time_to_target_s"] is None and s["epochs_to_target"] is None


def test_the_estimate_is_timed_between_control_reads(monkeypatch):
    """Steps 10 and 20 are control reads: 10 steps in 100 s is 10 s/step, and 980 steps to
    go is 2 h 43 min, which on a CPU also points to the demo (on a GPU it does not)."""
    from types import SimpleNamespace

    import torch

    from cifar_dist.trainer import progress

    def estimate(device: str, seconds: float) -> list[str]:
        clock = iter([5.0, 5.0 + seconds])
        monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
        lines: list[str] = []
        eta = progress.EstimatedTime(lines.append)
        eta.on_train_start(SimpleNamespace(rank=0, max_steps=1000, device=torch.device(device)))
        for step in range(1, 21):
            eta.on_step_end(step, {"lr": 0.1, **({"train_loss": 2.0} if step % 10 == 0 else {})})
        return lines

    line = (
        "estimated time to finish: 2 h 43 min for 980 more steps (10 s/step over steps 10-20; evaluation not included)"
    )
    assert estimate("meta", 100.0) == [line]
    demo = "; for a CPU demo of a few minutes: cifar-dist train --config configs/cpu_quick.yaml"
    assert estimate("cpu", 100.0) == [line + demo]
    assert estimate("cpu", 30.0) == [  # 49 min to go: no pointer
        "estimated time to finish: 49 min 00 s for 980 more steps (3 s/step over steps 10-20; evaluation not included)"
    ]
