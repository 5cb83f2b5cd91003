"""cifar-dist compare and cifar_dist.experiments.stats, on fake run directories (no training)."""

from __future__ import annotations

import argparse
import json
import math
import re

import numpy as np
import pytest
import yaml

from cifar_dist.errors import UserError
from cifar_dist.experiments import stats
from cifar_dist.experiments.compare import add_compare_arguments, run_compare


def _config(lr=0.001, seed=0, out_dir="", workers=2, name="default"):
    return {
        "data": {"root": "/data", "workers": workers, "loader": "torch", "flip": True},
        "model": {"name": "seed_resnet", "widths": [66, 132, 264]},
        "train": {"epochs": 3, "lr": lr, "batch_size": 128},
        "run": {"seed": seed, "out_dir": out_dir, "progress": False, "deterministic": False},
        "checkpoint": {"every_epochs": 1, "keep": 2},
        "eval": {"every_epochs": 1},
        "name": name,
    }


def make_run(path, acc, lr=0.001, seed=0, finished=True, target=None, workers=2, name="default"):
    """A run directory as training leaves it: config.yaml, metrics.jsonl and (if finished) summary.json."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(_config(lr, seed, str(path), workers, name), sort_keys=False))
    records = [
        {
            "epoch": e,
            "step": 10 * e,
            "train_loss": 1.0 / e,
            "train_acc": acc - 0.1 * (3 - e),
            "lr": lr,
            "epoch_time_s": 2.0,
            "images_per_s": 500.0,
        }
        for e in (1, 2, 3)
    ]
    for rec in records[1:]:  # evaluated at epochs 2 and 3 only
        rec.update(test_loss=0.5, test_acc=acc - 0.05 * (3 - rec["epoch"]))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        summary = {
            "test_acc": acc,
            "wall_time_s": 10.0 + seed,
            "train_time_s": 6.0,
            "images_per_s": 500.0 + seed,
            "epochs": 3,
            "steps": 30,
            "seed": seed,
            "world_size": 1,
        }
        if target is not None:
            summary.update(target)
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def compare(*dirs, out=None):
    ap = argparse.ArgumentParser()
    add_compare_arguments(ap)
    args = ap.parse_args([str(d) for d in dirs] + (["--out", str(out)] if out else []))
    assert run_compare(args) == 0
    return json.loads(((out or dirs[0]) / "compare.json").read_text())


# --- statistics ---


def test_t_cdf_against_closed_forms():
    for t in (-7.0, -1.0, 0.3, 1.0, 2.5, 40.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-14)
    for df in (1, 2, 3.7, 10, 100):
        assert stats.t_cdf(0.0, df) == 0.5
        assert stats.t_cdf(1.3, df) + stats.t_cdf(-1.3, df) == pytest.approx(1.0, abs=1e-15)
    assert stats.t_cdf(1.96, 1e7) == pytest.approx(0.9750021048517795, abs=1e-7)  # the normal limit


def test_t_quantile_against_known_values():
    # The quoted reference values (scipy's) agree to ~1e-10; the closed forms to ~1e-14.
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.706204736174707, rel=1e-12)
    assert stats.t_quantile(0.975, 2) == pytest.approx(4.302652729911275, rel=1e-9)
    assert stats.t_quantile(0.975, 10) == pytest.approx(2.2281388519649385, rel=1e-9)
    assert stats.t_quantile(0.975, 1) == pytest.approx(1 / math.tan(0.025 * math.pi), rel=1e-13)
    assert stats.t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-13)
    assert stats.t_quantile(0.5, 4) == 0.0
    assert stats.t_quantile(0.025, 10) == pytest.approx(-stats.t_quantile(0.975, 10), rel=1e-14)
    for df in (1, 3, 5.52, 30):
        for p in (0.6, 0.9, 0.995):
            assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-13)


def test_mean_std_and_ci():
    xs = [91.2, 92.5, 90.7]
    assert stats.mean(xs) == pytest.approx(np.mean(xs), rel=1e-15)
    assert stats.std(xs) == pytest.approx(np.std(xs, ddof=1), rel=1e-14)
    assert stats.std([3.0]) == 0.0
    assert stats.mean_ci([3.0]) is None
    lo, hi = stats.mean_ci(xs)
    half = 4.302652729911275 * np.std(xs, ddof=1) / math.sqrt(3)
    assert lo == pytest.approx(np.mean(xs) - half, rel=1e-9)
    assert hi == pytest.approx(np.mean(xs) + half, rel=1e-9)


def _two_sided_p_by_integration(t, df):
    """1 - 2 * the integral of Student's t density from 0 to |t| (Simpson's rule): independent of betainc."""
    x = np.linspace(0.0, abs(t), 200_001)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    y = c * (1 + x * x / df) ** (-(df + 1) / 2)
    h = x[1] - x[0]
    return 1.0 - 2.0 * h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())


def test_welch_p_value_by_hand():
    a, b = [1, 2, 3, 4], [2, 4, 6, 8, 10]
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 5  # 5/12 and 2
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)  # -3.5 / sqrt(29/12) = -2.2514
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 4)  # Welch-Satterthwaite: 5.5208
    assert t == pytest.approx(-2.2514363231593691)
    assert df == pytest.approx(5.5207877461706783)
    p = stats.welch_p_value(a, b)
    # 0.069133593192392413 (40-digit mpmath); Simpson's rule on the density agrees.
    assert p == pytest.approx(0.0691335931923924, rel=1e-12)
    assert p == pytest.approx(_two_sided_p_by_integration(t, df), rel=1e-10)
    assert stats.welch_p_value(b, a) == p


def test_welch_edge_cases():
    assert stats.welch_p_value([1.0], [1.0, 2.0]) is None
    assert stats.welch_p_value([2.0, 2.0], [2.0, 2.0, 2.0]) == 1.0
    assert stats.welch_p_value([2.0, 2.0], [3.0, 3.0]) == 0.0
    assert stats.welch_p_value([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert 0.0 < stats.welch_p_value([2.0, 2.0], [1.0, 3.0, 5.0]) < 1.0  # one group without variance


# --- compare ---


def test_groups_by_everything_but_the_seed(tmp_path, capsys):
    accs = {0.001: [0.90, 0.92, 0.91], 0.003: [0.85, 0.87, 0.88]}
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    names = [f"lr{lr}-s{seed}" for lr in accs for seed in range(3)] + ["lr0.003-s9", "never-started"]
    (sweep / "sweep.json").write_text(json.dumps({"config": None, "members": [{"name": n} for n in names]}))
    for lr, values in accs.items():
        for seed, acc in enumerate(values):
            # workers and name vary too, but do not change what is trained
            make_run(sweep / f"lr{lr}-s{seed}", acc, lr=lr, seed=seed, workers=seed, name=f"n{seed}")
    make_run(sweep / "lr0.003-s9", 0.5, lr=0.003, seed=9, finished=False)
    (sweep / "notes").mkdir()  # not a run: ignored
    report = compare(sweep)  # --out defaults to the sweep directory

    configs = report["configurations"]
    assert [c["label"] for c in configs] == ["train.lr=0.001", "train.lr=0.003"]
    assert [c["differs"] for c in configs] == [{"train.lr": 0.001}, {"train.lr": 0.003}]
    for c, values in zip(configs, accs.values()):
        pct = 100 * np.array(values)
        acc = c["test_acc_pct"]
        assert c["n"] == 3
        assert acc["mean"] == pytest.approx(pct.mean(), rel=1e-12)
        assert acc["std"] == pytest.approx(pct.std(ddof=1), rel=1e-12)
        assert (acc["min"], acc["max"]) == (pytest.approx(pct.min()), pytest.approx(pct.max()))
        half = 4.302652729911275 * pct.std(ddof=1) / math.sqrt(3)
        assert acc["ci95"] == pytest.approx([pct.mean() - half, pct.mean() + half], rel=1e-9)
        assert [r["test_acc_pct"] for r in c["runs"]] == pytest.approx(list(pct))
        assert [r["seed"] for r in c["runs"]] == [0, 1, 2]
        assert all(r["dir"].startswith(str(sweep)) for r in c["runs"])
        assert c["wall_time_s_mean"] == pytest.approx(11.0)
        assert c["images_per_s_mean"] == pytest.approx(501.0)
        assert c["target"] is None
    assert report["not_finished"] == [str(sweep / "lr0.003-s9"), str(sweep / "never-started")]
    (pair,) = report["pairs"]
    assert report["pairs_scope"] == "all"
    assert pair["p_value"] == pytest.approx(stats.welch_p_value([90, 92, 91], [85, 87, 88]), rel=1e-9)
    assert pair["diff_pct"] == pytest.approx(91.0 - 86.0 - 2 / 3)

    md = (sweep / "compare.md").read_text()
    assert "train.lr=0.003" in md and "Welch" in md and "not finished" in md.lower()
    assert str(sweep / "lr0.003-s9") in md
    assert (sweep / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert out.startswith(md) and "compare.json" in out.splitlines()[-1]


def test_single_configuration_is_named_and_targets_are_counted(tmp_path):
    runs = [
        make_run(tmp_path / "a", 0.93, seed=1, name="recipe", target={"time_to_target_s": 30.0, "epochs_to_target": 2}),
        make_run(tmp_path / "b", 0.94, seed=2, name="recipe", target={"time_to_target_s": 50.0, "epochs_to_target": 3}),
        make_run(
            tmp_path / "c", 0.80, seed=3, name="recipe", target={"time_to_target_s": None, "epochs_to_target": None}
        ),
    ]
    out = tmp_path / "out"
    report = compare(*runs, out=out)
    (c,) = report["configurations"]
    assert c["label"] == "recipe" and c["n"] == 3 and report["pairs"] == []
    assert c["target"] == {"reached": 2, "time_to_target_s_mean": 40.0, "epochs_to_target_mean": 2.5}
    assert "(2/3 reached)" in (out / "compare.md").read_text()
    assert (out / "compare.png").is_file()


def test_many_configurations_are_tested_against_the_first(tmp_path):
    lrs = [0.001 * (k + 1) for k in range(7)]
    for lr in lrs:
        make_run(tmp_path / "runs" / f"{lr}-0", 0.9, lr=lr, seed=0)
        make_run(tmp_path / "runs" / f"{lr}-1", 0.91, lr=lr, seed=1)
    report = compare(tmp_path / "runs", out=tmp_path / "out")
    assert len(report["configurations"]) == 7 and report["pairs_scope"] == "versus_first"
    first = report["configurations"][0]["label"]
    assert len(report["pairs"]) == 6 and all(p["a"] == first for p in report["pairs"])
    assert all(p["p_value"] == 1.0 for p in report["pairs"])


def test_single_run_has_no_interval(tmp_path):
    report = compare(make_run(tmp_path / "r", 0.9), out=tmp_path / "out")
    acc = report["configurations"][0]["test_acc_pct"]
    assert acc["std"] == 0.0 and acc["ci95"] is None
    assert "n < 2" in (tmp_path / "out" / "compare.md").read_text()


def test_bad_directories_are_user_errors_naming_the_path(tmp_path):
    ap = argparse.ArgumentParser()
    add_compare_arguments(ap)
    missing = tmp_path / "no-such-run"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        run_compare(ap.parse_args([str(missing), "--out", str(tmp_path / "out")]))
    empty = tmp_path / "empty"
    make_run(empty / "unfinished", 0.5, finished=False)
    with pytest.raises(UserError, match=re.escape(str(empty))) as e:
        run_compare(ap.parse_args([str(empty), "--out", str(tmp_path / "out")]))
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_runs_that_share_a_seed_count_once_and_the_interval_stays_within_0_and_100(tmp_path):
    """Two runs at 94.0 and 99.9 (seeds 0 and 1) give an interval past 100 by the formula; it is
    clipped. A third run repeating seed 1 adds no evidence: n stays 2, and it is flagged."""
    make_run(tmp_path / "a", 0.940, seed=0)
    make_run(tmp_path / "b", 0.999, seed=1)
    make_run(tmp_path / "c", 0.999, seed=1)
    report = compare(tmp_path / "a", tmp_path / "b", tmp_path / "c", out=tmp_path / "out")
    (config,) = report["configurations"]
    assert config["n"] == 2 and config["runs_counted"] == 3
    assert config["test_acc_pct"]["mean"] == pytest.approx((94.0 + 99.9) / 2)
    low, high = config["test_acc_pct"]["ci95"]
    assert 0.0 <= low and high == 100.0
    assert config["shared_seeds"] == {"1": [str(tmp_path / "b"), str(tmp_path / "c")]}
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "## Runs that share a seed" in md and "seed 1:" in md


@pytest.mark.parametrize("bad", [float("nan"), True, 1.5, "0.9"])
def test_an_impossible_accuracy_is_excluded_and_listed(tmp_path, bad):
    make_run(tmp_path / "good1", 0.91, seed=0)
    make_run(tmp_path / "good2", 0.92, seed=1)
    bad_run = make_run(tmp_path / "bad", 0.93, seed=2)
    summary = json.loads((bad_run / "summary.json").read_text())
    summary["test_acc"] = bad
    (bad_run / "summary.json").write_text(json.dumps(summary))  # NaN is written as the token NaN
    report = compare(tmp_path, out=tmp_path / "out")
    (config,) = report["configurations"]
    assert config["n"] == 2 and config["test_acc_pct"]["mean"] == pytest.approx(91.5)
    assert [r["dir"] for r in report["invalid"]] == [str(bad_run)]
    assert "## Invalid results (excluded from every statistic)" in (tmp_path / "out" / "compare.md").read_text()
