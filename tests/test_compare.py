"""cifar-dist compare and cifar_dist.experiments.stats, on fake run directories (no training)."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

import numpy as np
import pytest
import yaml
from scipy import stats as st

from cifar_dist.errors import UserError
from cifar_dist.experiments import stats
from cifar_dist.experiments.compare import add_compare_arguments, run_compare

from conftest import run


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

A = [91.2, 92.5, 90.7, 91.9, 92.1]
B = [90.4, 91.0, 90.6, 89.8, 91.6]


def test_mean_std_and_ci_match_scipy():
    xs = [91.2, 92.5, 90.7]
    assert stats.mean(xs) == pytest.approx(np.mean(xs), rel=1e-15)
    assert stats.std(xs) == pytest.approx(np.std(xs, ddof=1), rel=1e-15)
    assert stats.std([3.0]) == 0.0
    assert stats.mean_ci([3.0]) is None
    assert stats.mean_ci([3.0, 3.0]) == (3.0, 3.0)  # scipy's t.interval gives NaN here
    lo, hi = stats.mean_ci(xs)
    assert (lo, hi) == pytest.approx(st.t.interval(0.95, 2, loc=np.mean(xs), scale=st.sem(xs)), rel=1e-14)
    half = 4.302652729911275 * np.std(xs, ddof=1) / math.sqrt(3)  # t_{0.975, 2}, a table value
    assert (lo, hi) == pytest.approx((np.mean(xs) - half, np.mean(xs) + half), rel=1e-12)


def test_p_values_match_scipy():
    assert stats.welch_p_value(A, B) == pytest.approx(st.ttest_ind(A, B, equal_var=False).pvalue, abs=1e-10)
    assert stats.welch_p_value(B, A) == stats.welch_p_value(A, B)
    exact = st.PermutationMethod(n_resamples=np.inf)
    p = stats.mannwhitney_p_value(A, B)
    assert p == pytest.approx(st.mannwhitneyu(A, B, alternative="two-sided", method=exact).pvalue, abs=1e-10)
    # no ties here: the same as scipy's exact distribution of U
    assert p == pytest.approx(st.mannwhitneyu(A, B, alternative="two-sided", method="exact").pvalue, abs=1e-10)
    # with a tie, exact over all 20 splits of 3 + 3 values: 6 are as extreme
    assert stats.mannwhitney_p_value([1.0, 2.0, 2.0], [2.0, 4.0, 5.0]) == pytest.approx(0.3, abs=1e-12)
    big_a, big_b = A * 2, [x - 0.3 for x in B * 2]  # 10 values each: the normal approximation
    assert stats.mannwhitney_p_value(big_a, big_b) == pytest.approx(
        st.mannwhitneyu(big_a, big_b, alternative="two-sided", method="asymptotic").pvalue, abs=1e-10
    )


def test_welch_p_value_by_hand():
    a, b = [1, 2, 3, 4], [2, 4, 6, 8, 10]
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 5  # 5/12 and 2
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)  # -3.5 / sqrt(29/12) = -2.2514
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 4)  # Welch-Satterthwaite: 5.5208
    assert t == pytest.approx(-2.2514363231593691)
    assert df == pytest.approx(5.5207877461706783)
    # 0.069133593192392413 (40-digit mpmath)
    assert stats.welch_p_value(a, b) == pytest.approx(0.0691335931923924, rel=1e-12)


def test_bootstrap_interval_matches_scipy_and_repeats():
    def diff(x, y, axis=-1):
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    low, high, method = stats.bootstrap_diff_ci(A, B)
    ref = st.bootstrap((A, B), diff, n_resamples=9999, method="BCa", rng=np.random.default_rng(0))
    assert method == "BCa"
    assert (low, high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), rel=1e-12)
    assert low < np.mean(A) - np.mean(B) < high
    assert stats.bootstrap_diff_ci(A, B) == (low, high, method)  # a fixed seed: the same every time
    # equal values in both groups: BCa is undefined, the percentile interval is the difference itself
    assert stats.bootstrap_diff_ci([90.0, 90.0], [89.0, 89.0, 89.0]) == pytest.approx((1.0, 1.0, "percentile"))


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04; the last is raised to 0.06 (monotone)
    assert stats.holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06], abs=1e-15)
    # 0.02 * 3 = 0.06; 0.5 * 2 = 1.0 (capped at 1); 0.6 * 1 = 0.6, raised to 1.0
    assert stats.holm([0.5, 0.02, 0.6]) == pytest.approx([1.0, 0.06, 1.0], abs=1e-15)
    assert stats.holm([0.04, None, 0.01, 0.03]) == pytest.approx([0.06, None, 0.03, 0.06], abs=1e-15)  # m = 3
    assert stats.holm([0.7, 0.4]) == [0.8, 0.8]
    assert stats.holm([]) == []


def test_degenerate_samples():
    for fn in (stats.welch_p_value, stats.mannwhitney_p_value, stats.bootstrap_diff_ci):
        assert fn([1.0], [1.0, 2.0]) is None
    assert stats.welch_p_value([2.0, 2.0], [2.0, 2.0, 2.0]) == 1.0
    assert stats.welch_p_value([2.0, 2.0], [3.0, 3.0]) == 0.0
    assert stats.welch_p_value([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    one_flat = [2.0, 2.0], [1.0, 3.0, 5.0]  # one group without variance: an ordinary test
    with pytest.warns(RuntimeWarning, match="Precision loss"):  # scipy's warning, which stats keeps quiet
        ref = st.ttest_ind(*one_flat, equal_var=False).pvalue
    assert stats.welch_p_value(*one_flat) == pytest.approx(ref, abs=1e-10)
    assert stats.mannwhitney_p_value([2.0, 2.0], [2.0, 2.0, 2.0]) == 1.0


@pytest.mark.slow
def test_the_command_line_does_not_import_scipy_until_compare_computes():
    """scipy.stats takes about a second to import; every command builds the parser, which imports compare."""
    code = "import sys; from cifar_dist.cli.main import build_parser; build_parser(); print('scipy' in sys.modules)"
    assert run([sys.executable, "-c", code]).stdout.strip() == "False"


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
    a, b = list(100 * np.array(accs[0.001])), list(100 * np.array(accs[0.003]))
    assert pair["p_value"] == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue, abs=1e-10)
    assert pair["p_holm"] == pair["p_value"]  # one comparison: nothing to adjust
    assert pair["diff_pct"] == pytest.approx(91.0 - 86.0 - 2 / 3)
    assert pair["diff_ci95_bootstrap"] == pytest.approx(stats.bootstrap_diff_ci(a, b)[:2], rel=1e-12)
    assert pair["bootstrap_method"] == "BCa"
    assert (report["test"], report["p_adjustment"], report["comparisons_adjusted"]) == ("welch", "holm", 1)

    md = (sweep / "compare.md").read_text()
    assert "train.lr=0.003" in md and "Welch" in md and "not finished" in md.lower()
    assert str(sweep / "lr0.003-s9") in md
    assert (sweep / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert out.startswith(md) and "compare.json" in out.splitlines()[-1]


THREE = {0.001: [0.90, 0.92, 0.91, 0.915], 0.002: [0.85, 0.87, 0.88, 0.86], 0.003: [0.905, 0.89, 0.912, 0.90]}


def _three_configurations(path):
    for lr, values in THREE.items():
        for seed, acc in enumerate(values):
            make_run(path / f"lr{lr}-s{seed}", acc, lr=lr, seed=seed)
    return [list(100 * np.array(v)) for v in THREE.values()]


def test_three_configurations_welch_holm_adjusted(tmp_path):
    c1, c2, c3 = _three_configurations(tmp_path / "runs")
    report = compare(tmp_path / "runs", out=tmp_path / "out")
    assert [(p["a"], p["b"]) for p in report["pairs"]] == [
        ("train.lr=0.001", "train.lr=0.002"),
        ("train.lr=0.001", "train.lr=0.003"),
        ("train.lr=0.002", "train.lr=0.003"),
    ]
    p12, p13, p23 = (st.ttest_ind(x, y, equal_var=False).pvalue for x, y in ((c1, c2), (c1, c3), (c2, c3)))
    assert [p["p_value"] for p in report["pairs"]] == pytest.approx([p12, p13, p23], abs=1e-10)
    # Holm by hand: p12 < p23 < p13, multiplied by 3, 2 and 1 (already increasing, all below 1)
    assert p12 < p23 < p13 and 3 * p12 < 2 * p23 < p13 < 1
    assert [p["p_holm"] for p in report["pairs"]] == pytest.approx([3 * p12, p13, 2 * p23], abs=1e-10)
    for pair, (x, y) in zip(report["pairs"], ((c1, c2), (c1, c3), (c2, c3))):
        assert pair["diff_pct"] == pytest.approx(np.mean(x) - np.mean(y), rel=1e-12)
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "## Welch's t-test of the test-accuracy difference (every pair)" in md
    assert "| p-value | p (Holm) |" in md and "adjusted for the 3 comparisons" in md and "bootstrap" in md


def test_three_configurations_mann_whitney_holm_adjusted(tmp_path):
    c1, c2, c3 = _three_configurations(tmp_path / "runs")
    ap = argparse.ArgumentParser()
    add_compare_arguments(ap)
    assert (
        run_compare(ap.parse_args([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--test", "mannwhitney"]))
        == 0
    )
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    exact = st.PermutationMethod(n_resamples=np.inf)
    p12, p13, p23 = (st.mannwhitneyu(x, y, method=exact).pvalue for x, y in ((c1, c2), (c1, c3), (c2, c3)))
    assert [p["p_value"] for p in report["pairs"]] == pytest.approx([p12, p13, p23], abs=1e-10)
    # 4 against 4 values, no ties: 2 of the 70 splits separate the groups completely
    assert p12 == p23 == pytest.approx(2 / 70) and p13 == pytest.approx(16 / 70)
    # Holm by hand: the two smallest times 3 and 2 (0.0857, 0.0571: the second raised to 0.0857), p13 times 1
    assert [p["p_holm"] for p in report["pairs"]] == pytest.approx([3 * p12, 16 / 70, 3 * p12], abs=1e-10)
    assert report["test"] == "mannwhitney" and report["comparisons_adjusted"] == 3
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "## Mann–Whitney U test (two-sided) of the test-accuracy difference (every pair)" in md


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
    assert all(p["p_value"] == 1.0 and p["p_holm"] == 1.0 for p in report["pairs"])  # 6 * 1.0, capped at 1
    assert report["comparisons_adjusted"] == 6


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
