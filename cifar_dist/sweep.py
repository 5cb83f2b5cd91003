"""`cifar-dist sweep`: many seeds and settings as independent runs, compared with honest statistics.

    cifar-dist sweep --config configs/fast.yaml --seeds 5 train.lr=0.1,0.2 --out runs/lr-sweep
    cifar-dist sweep --config configs/fast.yaml --seeds 0,1,2,3,4,5,6,7 --parallel 8   # one GPU each
    cifar-dist sweep --config configs/fast.yaml --seeds 8 --out runs/s --plan-only    # then a Slurm array:
    sbatch --array=0-7 slurm/sweep.sh runs/s
    cifar-dist compare runs/lr-sweep

Every combination of the listed values (``key=v1,v2``; a value may itself be a list,
``model.widths=[32,64],[64,128]``) times every seed is a member: a normal run
directory under the sweep directory, named by its settings (``lr=0.1-seed=3``),
trained by the same entry point as a run started by hand with the same config and
overrides, so its result is that run's. ``sweep.json`` lists the members and their
state. Running the same command again resumes the sweep: finished members are
skipped, interrupted ones continue from their newest checkpoint. A member that
fails is recorded with its exit code and last error line; the others go on.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cifar_dist.errors import ConfigError, UserError


@dataclass
class Member:
    index: int
    name: str
    overrides: list[str]
    state: str = "pending"      # pending | done | failed
    exit_code: int | None = None
    error: str = ""             # the member's last error line
    wall_time_s: float | None = None
    extra: dict = field(default_factory=dict)


def split_values(text: str) -> list[str]:
    """``0.1,0.2`` -> ["0.1", "0.2"]; commas inside brackets belong to the value: ``[1,2],[3,4]``."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def parse_seeds(text: str) -> list[int]:
    """``5`` -> seeds 0..4; ``0,3,7`` -> those seeds."""
    try:
        seeds = [int(v) for v in text.split(",")] if "," in text else list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds: expected a count (5) or a list (0,1,2), got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct seeds >= 0, got {text!r}")
    return seeds


def _label(key: str, keys: list[str]) -> str:
    """The shortest name of ``key`` that no other swept key shares (``train.lr`` -> ``lr``)."""
    short = key.rpartition(".")[2]
    return short if sum(k.rpartition(".")[2] == short for k in keys) == 1 else key


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+\-]", "_", text.replace("[", "").replace("]", "").replace(" ", ""))


def expand(grid: list[str], seeds: list[int]) -> list[Member]:
    """Every combination of the grid's values, times every seed, in a stable order."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"command line: {item!r} is not key=value[,value...]")
        if key.strip() == "run.seed":
            raise ConfigError("command line: run.seed: use --seeds to sweep seeds")
        axes.append((key.strip(), split_values(values)))
    keys = [k for k, _ in axes]
    swept = [k for k, values in axes if len(values) > 1]  # a single value is a plain override: not in names
    members = []
    for combo in itertools.product(*[values for _, values in axes]):
        for seed in seeds:
            settings = [f"{k}={v}" for k, v in zip(keys, combo)]
            name = "-".join([_safe(f"{_label(k, swept)}={v}") for k, v in zip(keys, combo) if k in swept]
                            + [f"seed={seed}"])
            members.append(Member(len(members), name, settings + [f"run.seed={seed}"]))
    return members


class Sweep:
    """The sweep directory: sweep.json, one run directory per member, logs/, array/ (Slurm)."""

    def __init__(self, path: Path, config: str | None, members: list[Member]):
        self.path, self.config, self.members = Path(path), config, members

    @property
    def file(self) -> Path:
        return self.path / "sweep.json"

    def member_dir(self, m: Member) -> Path:
        return self.path / m.name

    def open(self) -> None:
        """Create the directory, or check that the one there holds this same sweep; refresh states
        (a member with a summary.json is done; any other is to run, failed ones again)."""
        if self.file.is_file():
            saved = json.loads(self.file.read_text())
            same = saved.get("config") == self.config and \
                [m["overrides"] for m in saved.get("members", [])] == [m.overrides for m in self.members]
            if not same:
                raise UserError(f"{self.file}: holds a different sweep (config or grid); choose another --out")
            for m, old in zip(self.members, saved["members"]):
                m.exit_code, m.wall_time_s = old.get("exit_code"), old.get("wall_time_s")
        self.path.mkdir(parents=True, exist_ok=True)
        for m in self.members:  # a state is derived from the member's directory, never trusted from the file
            if (self.member_dir(m) / "summary.json").is_file():
                m.state = "done"
            else:  # never finished, or failed: (re)run it
                m.state, m.exit_code, m.wall_time_s = "pending", None, None
        self.save()

    def save(self) -> None:
        data = {"config": self.config, "members": [asdict(m) for m in self.members]}
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.file)

    def train_args(self, m: Member) -> list[str]:
        """What `cifar-dist train` is given for ``m``: the run a user would start by hand, resumable."""
        config = ["--config", self.config] if self.config else []
        return [*config, "--out", str(self.member_dir(m)), "--resume", *m.overrides, "run.progress=false"]

    def write_array(self) -> int:
        """array/<index>.args for slurm/sweep.sh: slurm/train.sh's arguments, one per line."""
        folder = self.path / "array"
        folder.mkdir(exist_ok=True)
        for m in self.members:
            lines = [self.config or "", *m.overrides, f"run.out_dir={self.member_dir(m).resolve()}"]
            (folder / f"{m.index}.args").write_text("\n".join(lines) + "\n")
        return len(self.members)


def _slots(parallel: int) -> list[dict]:
    """Environment changes for each of ``parallel`` concurrent members: its own GPU, or its share of CPU threads."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g.strip()] if visible else None
    if gpus is None:
        try:
            import torch
            gpus = [str(i) for i in range(torch.cuda.device_count())]
        except ImportError:
            gpus = []
    if gpus:
        if parallel > len(gpus):
            raise ConfigError(f"--parallel: {parallel} members at once, but {len(gpus)} GPU(s) are visible")
        return [{"CUDA_VISIBLE_DEVICES": gpus[i]} for i in range(parallel)]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    return [{"threads": str(threads)} if parallel > 1 else {} for _ in range(parallel)]


def _last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("cifar-dist:")]
    return (errors or lines or [""])[-1][:300]


def _check_members(config: str | None, members: list[Member]) -> dict[int, str]:
    """Each member's config, checked before anything runs: {index: error} for the bad ones.
    When every member fails the same way (a bad file, an unknown key), that is the error."""
    from cifar_dist.config import load_config

    refused = {}
    for m in members:
        try:
            load_config(config, m.overrides)
        except ConfigError as e:
            refused[m.index] = str(e)
    if len(refused) == len(members) and len(set(refused.values())) == 1:
        raise ConfigError(refused[0])
    return refused


def run_members(sweep: Sweep, parallel: int, user_threads: bool) -> list[Member]:
    """Train every member not done yet (and not refused), ``parallel`` at a time; returns the failed ones."""
    todo = [m for m in sweep.members if m.state == "pending"]
    logs = sweep.path / "logs"
    logs.mkdir(exist_ok=True)
    free, running, total = _slots(parallel), {}, len(sweep.members)
    done_before = total - len(todo)
    print(f"sweep {sweep.path}: {total} members, {done_before} done, {len(todo)} to run, {parallel} at a time",
          flush=True)
    while todo or running:
        while todo and free:
            m, slot = todo.pop(0), free.pop(0)
            env = dict(os.environ, **{k: v for k, v in slot.items() if k != "threads"})
            threads = [f"run.threads={slot['threads']}"] if "threads" in slot and not user_threads else []
            log = open(logs / f"{m.name}.log", "a")
            cmd = [sys.executable, "-m", "cifar_dist.train", *sweep.train_args(m), *threads]
            running[m.index] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), m, slot,
                                time.time(), log)
            print(f"[{m.index + 1}/{total}] {m.name}: started", flush=True)
        time.sleep(0.2)
        for index, (proc, m, slot, started, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[index]
            free.append(slot)
            m.exit_code, m.wall_time_s = proc.returncode, round(time.time() - started, 1)
            if proc.returncode == 0 and (sweep.member_dir(m) / "summary.json").is_file():
                m.state, m.error = "done", ""
                acc = json.loads((sweep.member_dir(m) / "summary.json").read_text())["test_acc"]
                outcome = f"done, test accuracy {100 * acc:.2f}%"
            else:
                m.state, m.error = "failed", _last_error(logs / f"{m.name}.log")
                outcome = f"FAILED (exit {proc.returncode}): {m.error}"
            sweep.save()
            print(f"[{m.index + 1}/{total}] {m.name}: {outcome} ({m.wall_time_s:.0f} s)", flush=True)
    return [m for m in sweep.members if m.state == "failed"]


def add_sweep_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="YAML recipe every member starts from")
    ap.add_argument("--seeds", default="1", help="a count (5: seeds 0..4) or a list (0,1,2); default 1 (seed 0)")
    ap.add_argument("--out", help="sweep directory (default runs/sweep-<config>-<time>)")
    ap.add_argument("--parallel", type=int, default=1, metavar="K",
                    help="members at once: one GPU each, or a share of the CPU threads each (default 1)")
    ap.add_argument("--plan-only", action="store_true",
                    help="write sweep.json and the Slurm array files, train nothing (then: sbatch slurm/sweep.sh)")
    ap.add_argument("overrides", nargs="*", metavar="key=v1,v2",
                    help="the grid: every combination of the listed values (a single value: a plain override)")


def run_sweep(args) -> int:
    from cifar_dist.config import load_config

    if args.parallel < 1:
        raise ConfigError(f"--parallel: must be >= 1, got {args.parallel}")
    members = expand(args.overrides, parse_seeds(args.seeds))
    refused = _check_members(args.config, members)
    config = str(Path(args.config).resolve()) if args.config else None
    name = Path(args.config).stem if args.config else "default"
    sweep = Sweep(Path(args.out or f"runs/sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}"), config, members)
    sweep.open()
    for m in members:
        if m.index in refused:  # what `cifar-dist train` would have said, without starting it
            m.state, m.exit_code, m.error = "failed", 2, f"cifar-dist: {refused[m.index]}"
    sweep.save()
    if args.plan_only:
        n = sweep.write_array()
        print(f"planned {n} members in {sweep.file}; submit them as a Slurm job array:\n"
              f"  sbatch --array=0-{n - 1} slurm/sweep.sh {sweep.path}\n"
              f"  (--array=0-{n - 1}%K runs at most K at once; then: cifar-dist compare {sweep.path})")
        return 0
    user_threads = any(o.startswith("run.threads=") for o in args.overrides) or \
        load_config(args.config).run.threads > 0
    failed = run_members(sweep, args.parallel, user_threads)
    done = sum(m.state == "done" for m in sweep.members)
    print(f"sweep {sweep.path}: {done} of {len(sweep.members)} members done, {len(failed)} failed"
          + ("" if failed else f"; compare them: cifar-dist compare {sweep.path}"))
    for m in failed:
        print(f"  failed: {m.name} (exit {m.exit_code}): {m.error}")
    return 1 if failed else 0
