"""`cifar-dist compare`: final test accuracies of runs grouped into configurations, with intervals
and Holm-adjusted tests of every pair; writes compare.md, .json and .png (docs/sweeps.md#compare-runs)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from cifar_dist.config.loading import read_yaml
from cifar_dist.config.overrides import override_text
from cifar_dist.config.schema import flatten_keys, result_free_keys, result_keys_in
from cifar_dist.errors import UserError
from cifar_dist.experiments import stats
from cifar_dist.storage.files import utf8_path, write_text_atomic
from cifar_dist.storage.metrics import read_metrics
from cifar_dist.storage.plots import epoch_axis, pyplot, save_figure

# Keys that may differ between runs of one configuration.
IGNORED_KEYS = result_free_keys() | {"run.seed"}
MAX_ALL_PAIRS = 6  # above this many configurations, each is tested against the first only
_ABSENT = "<absent>"
# --test: the p-value of each pair, and how compare.md names the test
TESTS = {
    "welch": (stats.welch_p_value, "Welch's t-test"),
    "mannwhitney": (stats.mannwhitney_p_value, "Mann–Whitney U test (two-sided)"),
}


def add_compare_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments of `cifar-dist compare`: DIR..., --out and --test."""
    ap.add_argument(
        "dirs", nargs="+", metavar="DIR", help="run directories, or directories holding runs (a sweep directory, runs/)"
    )
    ap.add_argument(
        "--out",
        metavar="DIR",
        help="where compare.md/.json/.png go (default: the first DIR if it is a sweep "
        "directory, else ./compare-<time>)",
    )
    ap.add_argument(
        "--test",
        choices=sorted(TESTS),
        default="welch",
        help="the test of each pair's difference: Welch's t-test (default) or the Mann-Whitney U test, "
        "which assumes no normal distribution; either is Holm-adjusted for the number of pairs",
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data


def valid_accuracy(value) -> bool:
    """A test accuracy that can be averaged: a finite number in [0, 1] (not a boolean, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _read_run(path: Path) -> dict:
    """One finished run: flattened config, summary, per-epoch test accuracy, and an ``invalid``
    reason when its test_acc cannot be counted."""
    summary = _read_json(path / "summary.json")
    invalid = None
    if not valid_accuracy(summary.get("test_acc")):
        invalid = f"test_acc is {str(summary.get('test_acc', 'missing'))[:40]}, not a number in [0, 1]"
    config = read_yaml(path / "config.yaml")  # read as data: nothing it names is imported
    curve = {row["epoch"]: 100.0 * row["test_acc"] for row in read_metrics(path) if valid_accuracy(row.get("test_acc"))}
    return {"dir": str(path), "config": flatten_keys(config), "summary": summary, "curve": curve, "invalid": invalid}


def _looks_like_run(path: Path) -> bool:
    return any((path / f).exists() for f in ("summary.json", "config.yaml", "metrics.jsonl", ".lock"))


def _sweep_members(path: Path) -> list[Path]:
    """The member directories that a sweep.json in ``path`` names (none if there is none or it is unreadable)."""
    try:
        members = json.loads((path / "sweep.json").read_text()).get("members", [])
        return sorted(path / m["name"] for m in members if isinstance(m.get("name"), str) and m["name"])
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def collect_runs(dirs: list[str]) -> tuple[list[dict], list[str]]:
    """The finished runs in ``dirs`` (run directories or directories of runs) and the paths of
    unfinished ones; a UserError for a directory without a finished run."""
    runs, unfinished, seen = [], [], set()
    for d in dirs:
        path = Path(d)
        if not path.is_dir():
            raise UserError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}")
        if (path / "summary.json").is_file():
            members = [path]
        else:
            members = sorted(p for p in path.iterdir() if p.is_dir() and _looks_like_run(p))
            members += [p for p in _sweep_members(path) if p not in members]  # also those never started
        finished = [p for p in members if (p / "summary.json").is_file()]
        if not finished:
            raise UserError(f"{path}: holds no finished run (no summary.json in it or its subfolders)")
        for p in members:
            if p.resolve() in seen:
                continue
            seen.add(p.resolve())
            if p in finished:
                runs.append(_read_run(p))
            else:
                unfinished.append(str(p))
    return runs, unfinished


def group_runs(runs: list[dict]) -> list[dict]:
    """Configurations, in order of first appearance: {label, differs, name, runs}."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        ident = {k: v for k, v in run["config"].items() if k not in _ignored(run["config"])}
        groups.setdefault(json.dumps(ident, sort_keys=True, default=str), []).append(run)
    members = list(groups.values())
    keys: list[str] = []
    for group in members:
        keys += [k for k in group[0]["config"] if k not in _ignored(group[0]["config"]) and k not in keys]
    differing = [k for k in keys if len({json.dumps(g[0]["config"].get(k, _ABSENT), default=str) for g in members}) > 1]
    out = []
    for group in members:
        cfg = group[0]["config"]
        name = str(cfg.get("name") or group[0]["summary"].get("config") or Path(group[0]["dir"]).name)
        differs = {k: cfg.get(k, _ABSENT) for k in differing}
        label = ", ".join(f"{k}={override_text(v)}" for k, v in differs.items()) if len(members) > 1 else name
        out.append({"label": label, "differs": differs, "name": name, "runs": group})
    return out


def _ignored(flat: dict) -> frozenset[str]:
    """IGNORED_KEYS, less the result-free keys that change this configuration's result."""
    return IGNORED_KEYS - result_keys_in(flat)


def _mean_of(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return stats.mean(values) if values else None


def _seed_of(run: dict):
    return run["summary"].get("seed", run["config"].get("run.seed"))


def per_seed(runs: list[dict]) -> tuple[list[float], dict]:
    """One accuracy (%) per distinct seed, and {seed: [dirs]} of shared seeds: runs of one seed
    repeat one experiment, so counting each would shrink the interval without new evidence."""
    by_seed: dict = {}
    for r in runs:
        by_seed.setdefault(json.dumps(_seed_of(r), default=str), []).append(r)
    values = [stats.mean([100.0 * r["summary"]["test_acc"] for r in rs]) for rs in by_seed.values()]
    shared = {str(_seed_of(rs[0])): [r["dir"] for r in rs] for rs in by_seed.values() if len(rs) > 1}
    return values, shared


def summarize(group: dict) -> dict:
    """One configuration's numbers as compare.json holds them (accuracies in %)."""
    runs = group["runs"]
    accs = [100.0 * r["summary"]["test_acc"] for r in runs]
    seeds, shared = per_seed(runs)
    ci = stats.mean_ci(seeds)
    ci = (max(0.0, ci[0]), min(100.0, ci[1])) if ci else None
    sums = [r["summary"] for r in runs]
    target = None
    if any(k in s for s in sums for k in ("time_to_target_s", "epochs_to_target")):
        reached = [s for s in sums if s.get("time_to_target_s") is not None or s.get("epochs_to_target") is not None]
        target = {
            "reached": len(reached),
            "time_to_target_s_mean": _mean_of([s.get("time_to_target_s") for s in reached]),
            "epochs_to_target_mean": _mean_of([s.get("epochs_to_target") for s in reached]),
        }
    return {
        "label": group["label"],
        "name": group["name"],
        "differs": group["differs"],
        "n": len(seeds),
        "runs_counted": len(accs),
        "shared_seeds": shared,
        "test_acc_pct": {
            "mean": stats.mean(seeds),
            "std": stats.std(seeds),
            "min": min(accs),
            "max": max(accs),
            "ci95": list(ci) if ci else None,
            "per_seed": seeds,
        },
        "data": sorted({_data_name(s.get("data")) for s in sums}),
        "wall_time_s_mean": _mean_of([s.get("wall_time_s") for s in sums]),
        "images_per_s_mean": _mean_of([s.get("images_per_s") for s in sums]),
        "target": target,
        "runs": [{"dir": r["dir"], "seed": _seed_of(r), "test_acc_pct": a} for r, a in zip(runs, accs)],
    }


def _data_name(data) -> str:
    """Which data a run's accuracy is on, from summary.json's ``data`` record."""
    if not isinstance(data, dict):
        return "data not recorded"
    if data.get("source") == "synthetic":
        return "synthetic data"
    if data.get("official"):
        return "CIFAR-10 (official files)"
    return f"a CIFAR-10 copy that is not the official files (md5 {str(data.get('md5', ''))[:8]})"


def pair_tests(
    configs: list[dict], runs_by_label: dict[str, list[float]], test: str = "welch"
) -> tuple[str, list[dict]]:
    """(scope, pairs): every pair's, or beyond MAX_ALL_PAIRS each versus the first's, difference
    of means with its bootstrap interval and ``test``'s p-value, raw and Holm-adjusted."""
    labels = [c["label"] for c in configs]
    if len(labels) > MAX_ALL_PAIRS:
        scope, pairs = "versus_first", [(labels[0], b) for b in labels[1:]]
    else:
        scope, pairs = "all", [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]
    means = {c["label"]: c["test_acc_pct"]["mean"] for c in configs}
    p_value = TESTS[test][0]
    out = []
    for a, b in pairs:
        ci = stats.bootstrap_diff_ci(runs_by_label[a], runs_by_label[b])
        out.append(
            {
                "a": a,
                "b": b,
                "diff_pct": means[a] - means[b],
                "diff_ci95_bootstrap": list(ci[:2]) if ci else None,
                "bootstrap_method": ci[2] if ci else None,
                "p_value": p_value(runs_by_label[a], runs_by_label[b]),
            }
        )
    for pair, adjusted in zip(out, stats.holm([p["p_value"] for p in out])):
        pair["p_holm"] = adjusted
    return scope, out


def _num(v, fmt: str = ".2f", missing: str = "–") -> str:
    return missing if v is None else format(v, fmt)


def _interval(ci, fmt: str) -> str:
    return "– (n < 2)" if ci is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _pairs_section(report: dict) -> list[str]:
    scope = "each versus the first" if report["pairs_scope"] == "versus_first" else "every pair"
    tested = report["comparisons_adjusted"]
    boot = report["bootstrap"]
    lines = ["", f"## {TESTS[report['test']][1]} of the test-accuracy difference ({scope})", ""]
    rows = []
    for p in report["pairs"]:
        ci = _interval(p["diff_ci95_bootstrap"], "+.2f")
        if p["bootstrap_method"] == "percentile":
            ci += " (percentile)"
        p_value = _num(p["p_value"], ".3g", missing="– (n < 2)")
        rows.append([p["a"], p["b"], f"{p['diff_pct']:+.2f}", ci, p_value, _num(p["p_holm"], ".3g")])
    lines += _table(["A", "B", "A − B (points)", "95% CI of A − B (bootstrap)", "p-value", "p (Holm)"], rows)
    lines += [
        "",
        f"p (Holm): the p-values adjusted for the {tested} comparison{'s' * (tested != 1)} in this table "
        "(Holm–Bonferroni): calling different every pair whose p (Holm) is below 0.05 keeps the chance of "
        "any false call among them below 5%. 95% CI of A − B: a bootstrap interval of the difference of the "
        f"means, each configuration's seeds resampled ({boot['resamples']} resamples, seed {boot['seed']}; BCa, "
        "or percentile where BCa is undefined); with few seeds it tends to be too narrow.",
    ]
    return lines


def to_markdown(report: dict) -> str:
    configs = report["configurations"]
    nruns = sum(c.get("runs_counted", c["n"]) for c in configs)
    lines = [
        f"# Comparison: {nruns} finished run{'s' * (nruns != 1)} in {len(configs)} "
        f"configuration{'s' * (len(configs) != 1)}",
        "",
        "Final test accuracy in %; n counts distinct seeds (runs that share a seed are averaged into one "
        "value); the 95% CI is that of the mean (Student's t, n - 1 degrees of freedom), clipped to [0, 100].",
        "Data: " + "; ".join(sorted({d for c in configs for d in c["data"]})) + ".",
        "",
    ]
    has_target = any(c["target"] for c in configs)
    header = ["configuration", "n", "test acc (mean ± std)", "min", "max", "95% CI", "wall time (s)", "images/s"]
    header += ["time to target (s)", "epochs to target"] if has_target else []
    rows = []
    for c in configs:
        acc, t = c["test_acc_pct"], c["target"]
        row = [c["label"], str(c["n"]), f"{acc['mean']:.2f} ± {acc['std']:.2f}", _num(acc["min"]), _num(acc["max"])]
        row += [_interval(acc["ci95"], ".2f"), _num(c["wall_time_s_mean"], ".1f"), _num(c["images_per_s_mean"], ".0f")]
        if has_target:
            row += [
                f"{_num(t['time_to_target_s_mean'], '.1f')} ({t['reached']}/{c['n']} reached)" if t else "–",
                _num(t["epochs_to_target_mean"], ".1f") if t else "–",
            ]
        rows.append(row)
    lines += _table(header, rows)
    if report["pairs"]:
        lines += _pairs_section(report)
    lines += ["", "## Runs", ""]
    lines += _table(
        ["configuration", "run directory", "seed", "test acc"],
        [[c["label"], r["dir"], str(r["seed"]), f"{r['test_acc_pct']:.2f}"] for c in configs for r in c["runs"]],
    )
    shared = [f"{c['label']}: seed {s}: {', '.join(dirs)}" for c in configs for s, dirs in c["shared_seeds"].items()]
    lines += _list_section("Runs that share a seed (counted once: they repeat one experiment)", shared)
    invalid = [f"{r['dir']}: {r['reason']}" for r in report["invalid"]]
    lines += _list_section("Invalid results (excluded from every statistic)", invalid)
    lines += _list_section("Not finished (no summary.json; not counted)", report["not_finished"])
    return "\n".join(lines) + "\n"


def _list_section(title: str, items: list[str]) -> list[str]:
    return ["", f"## {title}", "", *(f"- {item}" for item in items)] if items else []


def plot_curves(groups: list[dict], path: Path, title: str = "") -> None:
    """Mean test accuracy per configuration over the epochs where it was recorded, with a min-max band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    all_epochs = []
    for g in groups:
        epochs = sorted({e for r in g["runs"] for e in r["curve"]})
        if not epochs:
            continue
        all_epochs += epochs
        values = [[r["curve"][e] for r in g["runs"] if e in r["curve"]] for e in epochs]
        marker = "o" if len(epochs) < 30 else None
        label = f"{g['label']} (n={len(g['runs'])})"
        (line,) = ax.plot(epochs, [stats.mean(v) for v in values], marker=marker, label=label)
        ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
    if all_epochs:
        ax.legend(fontsize="small")
    else:
        ax.text(
            0.5, 0.5, "no test accuracy recorded in metrics.jsonl", ha="center", va="center", transform=ax.transAxes
        )
    epoch_axis(ax, all_epochs)
    ax.set_ylabel("test accuracy (%)")
    prefix = f"{title}: " if title else ""
    ax.set_title(f"{prefix}test accuracy, mean per configuration, band from min to max over its runs", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def run_compare(args) -> int:
    """Compare the runs in ``args.dirs``, write compare.md/.json/.png and print the Markdown."""
    if args.out:
        utf8_path(Path(args.out).absolute())
    runs, unfinished = collect_runs(args.dirs)
    invalid = [{"dir": r["dir"], "reason": r["invalid"]} for r in runs if r["invalid"]]
    runs = [r for r in runs if not r["invalid"]]
    if not runs:
        first = invalid[0]
        raise UserError(f"{args.dirs[0]}: no finished run with a valid test_acc ({first['dir']}: {first['reason']})")
    groups = group_runs(runs)
    configs = [summarize(g) for g in groups]
    scope, pairs = pair_tests(configs, {c["label"]: c["test_acc_pct"]["per_seed"] for c in configs}, args.test)
    report = {
        "configurations": configs,
        "pairs_scope": scope,
        "test": args.test,
        "p_adjustment": "holm",
        "comparisons_adjusted": sum(p["p_value"] is not None for p in pairs),
        "bootstrap": {"level": 0.95, "resamples": stats.BOOTSTRAP_RESAMPLES, "seed": stats.BOOTSTRAP_SEED},
        "pairs": pairs,
        "not_finished": unfinished,
        "invalid": invalid,
    }
    if args.out:
        out = Path(args.out)
    elif (Path(args.dirs[0]) / "sweep.json").is_file():
        out = Path(args.dirs[0])
    else:
        out = Path(f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(report)
    files = out / "compare.md", out / "compare.json", out / "compare.png"
    write_text_atomic(files[0], markdown)
    write_text_atomic(files[1], json.dumps(report, indent=1, default=str) + "\n")
    plot_curves(groups, files[2], title=", ".join(Path(d).name for d in args.dirs)[:80])
    print(markdown, end="")
    print(f"written {files[0]}, {files[1]}, {files[2]}")
    return 0
