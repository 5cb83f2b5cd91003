"""Check the GPU path end to end on one NVIDIA GPU, in minutes, into one folder.

    bash scripts/gpu_check.sh [--full] [--out DIR] [--archive cifar10-jpeg.tar.gz]
    bash scripts/gpu_check.sh --dry-run          # on a CPU: tiny sizes, proves the wiring

Runs with the machine's own PyTorch (no setup, no network; the wrapper sets
PYTHONPATH). Steps, each in a process of its own with a time limit, each
recorded in OUT/report.md whatever the others do:

  env     GPU, driver, torch, CUDA, the optional packages (FFCV, DeepSpeed)
  data    CIFAR-10 from the JPEG archive (or an existing data.root)
  sync    50 steady-state steps of the paper's model (configs/fast.yaml's
          settings) under torch.cuda.set_sync_debug_mode: the host may wait
          for the device only at the amortized control reads
  bench   plain fp32 eager baseline; bf16 + channels_last, compiled and not;
          batches 128 and 512; torch and gpu loaders
  profile one bf16 channels_last row under `bench --profile`: the CUDA trace, the device
          time of the kernels and the memory snapshot must be there
  epoch   one timed epoch of configs/fast.yaml (EMA, Lookahead, flip-and-translate TTA,
          the TensorBoard tracker), with its test accuracy, MFU and peak memory
  --full  configs/airbench94.yaml timed to 90% (eval.target_acc), the paper's 60-epoch recipe
          and the full configs/fast.yaml run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHIVES = ("cifar10-jpeg.tar.gz", "data/cifar10-jpeg.tar.gz", "../shared/data/cifar10-jpeg.tar.gz")
# --dry-run: the same commands at sizes a CPU runs in seconds
TINY = ["model.widths=[8]", "model.blocks=[1]", "run.threads=2"]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "cifar_dist.cli", *map(str, args)]


class Steps:
    """Runs the steps, each with a time limit; keeps what each printed and how it ended."""

    def __init__(self, out: Path, env: dict):
        self.out, self.env, self.results = out, env, []

    def run(self, name: str, cmd: list[str], limit_s: float) -> bool:
        print(f"[{name}] {' '.join(cmd[2:] if cmd[1] == '-m' else cmd)}", flush=True)
        t0 = time.time()
        log = self.out / f"{name}.log"
        with open(log, "w") as f:
            try:
                rc = subprocess.run(
                    cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, timeout=limit_s
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = time.time() - t0
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        self.results.append({"step": name, "rc": rc, "wall_s": round(wall, 1), "last_line": tail[0][:200]})
        print(f"[{name}] {'ok' if rc == 0 else f'FAILED ({rc})'} in {wall:.0f} s: {tail[0][:160]}", flush=True)
        return rc == 0

    def skip(self, name: str, why: str) -> None:
        self.results.append({"step": name, "rc": "skipped", "wall_s": 0.0, "last_line": why})
        print(f"[{name}] skipped: {why}", flush=True)


def environment(out: Path) -> dict:
    """GPU, driver, versions and optional packages, as JSON and as printed by nvidia-smi."""
    import importlib.util

    import torch

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpus": [],
        "driver": None,
    }
    for name in ("accelerate", "deepspeed", "ffcv", "torchvision"):
        info[name] = "installed" if importlib.util.find_spec(name) else "absent (its parts are skipped)"
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append(
            {
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
                "bf16": torch.cuda.is_bf16_supported(),
            }
        )
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
        (out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    (out / "env.json").write_text(json.dumps(info, indent=1))
    return info


def sync_check(out: Path, data_root: str | None, dry: bool, steps: int = 50) -> int:
    """``steps`` steady-state steps of fit's step and control work under the CUDA sync debug
    mode; every host wait is recorded. Passes when the only waits are the control reads."""
    import warnings

    import torch

    from cifar_dist.config.loading import load_config
    from cifar_dist.distributed.accelerator import make_accelerator
    from cifar_dist.trainer.build import build_data, resolve_run_precision
    from cifar_dist.trainer.epoch import EpochTotals
    from cifar_dist.trainer.trainer import Trainer

    overrides = ["train.epochs=100", "run.progress=false", "run.trackers=[]"]
    overrides += ["data.synthetic=true"] if data_root is None else [f"data.root={data_root}"]
    overrides += TINY + ["train.batch_size=64", "run.compile=false"] if dry else []
    cfg = load_config(str(REPO / "configs" / "fast.yaml"), overrides)
    resolve_run_precision(cfg)
    accelerator = make_accelerator(cfg)
    shard, train_set, eval_set, _ = build_data(cfg, accelerator)
    trainer = Trainer(cfg, accelerator, shard, train_set, eval_set, out / "sync-run")
    totals = EpochTotals.start(trainer.device)
    stream, warmup, done, reads = trainer.loader.iter_epoch(0), 3 * 10, 0, 0
    cuda = trainer.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(warmup + steps):
            if i == warmup and cuda:
                torch.cuda.synchronize(trainer.device)
                caught.clear()
                torch.cuda.set_sync_debug_mode("warn")
            done += 1
            read = trainer.steady_step(next(stream), done, totals)
            reads += read and i >= warmup
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    result = {
        "device": str(trainer.device),
        "steps": steps,
        "control_reads": reads,
        "host_waits": len(waits),
        "examples": sorted(set(waits))[:5],
        "checked": cuda,
        "ok": (len(waits) <= reads) if cuda else None,
    }
    (out / "sync.json").write_text(json.dumps(result, indent=1))
    verdict = (
        "not checked: no GPU (the CPU suite counts syncs instead)" if not cuda else "ok" if result["ok"] else "FAILED"
    )
    print(f"sync check: {steps} steps, {reads} control reads, {len(waits)} host waits: {verdict}")
    return 0 if result["ok"] is not False else 1


def _find_archive(given: str | None) -> Path | None:
    for candidate in ([given] if given else []) + [str(REPO / a) for a in ARCHIVES]:
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


def _accuracy_line(run: Path) -> str:
    """The run's result, with its last epoch's training MFU and peak memory (metrics.jsonl)."""
    s = json.loads((run / "summary.json").read_text())
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    mfu = "n/a" if last.get("mfu") is None else f"{100 * last['mfu']:.1f}%"
    target = ""
    if s.get("target_acc"):
        reached = s.get("time_to_target_s")
        target = f"; {100 * s['target_acc']:.0f}% " + (
            f"reached in {reached:.1f} s (epoch {s['epochs_to_target']})" if reached is not None else "not reached"
        )
    return (
        f"{run.name}: test accuracy {100 * s['test_acc']:.2f}% after {s['epochs']} epochs "
        f"({s['weights']} weights, {s['tta']} TTA), {s['wall_time_s']:.0f} s wall, "
        f"{s['images_per_s']:,.0f} img/s on {s['device']}; last epoch MFU {mfu}, "
        f"peak memory {last.get('peak_memory_gb', 0):.2f} GB{target}"
    )


def _profile_check(bench: Path, cuda: bool) -> dict:
    """The profiled row's files: on CUDA its kernels' device time and its memory snapshot."""
    row = json.loads((bench / "bench.json").read_text())["rows"][0]
    folder = bench / row["profile"]
    summary = json.loads((folder / "profile_summary.json").read_text())["ranks"]["0"]
    shares = ", ".join(f"{k} {100 * v['share']:.0f}%" for k, v in summary["ranges"].items())
    line = f"{row['profile']}: {summary['step_ms']:.1f} ms/step ({shares}); snapshot {summary['memory_snapshot']}"
    missing = []
    if not (folder / "rank0.pt.trace.json.gz").is_file():
        missing.append("trace")
    if cuda and not summary["device_ms"]:
        missing.append("CUDA kernel times")
    if cuda and not (folder / "memory_snapshot_rank0.pickle").is_file():
        missing.append("memory snapshot")
    if missing:
        return {"rc": "missing " + ", ".join(missing), "last_line": line}
    return {"last_line": line}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", nargs="?", choices=("all", "sync"), default="all")
    ap.add_argument("--out", help="output folder (default runs/gpu-check-<time>)")
    ap.add_argument("--archive", help="CIFAR-10 JPEG archive (default: cifar10-jpeg.tar.gz next to the repository)")
    ap.add_argument("--data", help="CIFAR-10 folder (default: $CIFAR_DIST_DATA, else OUT/../cifar10)")
    ap.add_argument(
        "--full", action="store_true", help="also airbench94 to 90%, the paper's 60 epochs and the full fast recipe"
    )
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes: proves the wiring on a CPU")
    args = ap.parse_args(argv)
    out = Path(args.out or REPO / "runs" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.step == "sync":
        return sync_check(out, args.data, args.dry_run)

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    steps = Steps(out, env)
    info = environment(out)
    gpus = ", ".join(g["name"] for g in info["gpus"]) or "none"
    print(f"[env] torch {info['torch']} (CUDA {info['cuda']}), driver {info['driver']}, GPUs: {gpus}")
    if not info["gpus"] and not args.dry_run:
        print("gpu-check: no CUDA GPU visible; use --dry-run to check the wiring on a CPU", file=sys.stderr)
        return 2
    tiny = TINY if args.dry_run else []
    data = args.data or os.environ.get("CIFAR_DIST_DATA") or str(out.parent / "cifar10")
    archive = _find_archive(args.archive)
    have_data = (Path(data) / "cifar-10-batches-py" / "test_batch").is_file()
    if archive is not None and not have_data:
        have_data = steps.run("data", _cli("prepare", "--root", data, "--from-archive", archive, "--no-download"), 120)
    elif not have_data:
        steps.skip(
            "data", "no CIFAR-10 archive or folder; the bench and sync use synthetic data, the timed runs are skipped"
        )
    data_args = [f"data.root={data}"] if have_data else ["data.synthetic=true"]

    steps.run(
        "sync",
        [sys.executable, __file__, "sync", "--out", str(out)]
        + (["--data", data] if have_data else [])
        + (["--dry-run"] if args.dry_run else []),
        180,
    )
    loaders = "torch,gpu" if have_data else "synthetic"
    shape = (
        ["--batch-sizes", "64,128", "--warmup", "1", "--steps", "2", "--repeats", "1"]
        if args.dry_run
        else ["--batch-sizes", "128,512", "--warmup", "5", "--steps", "20", "--repeats", "3"]
    )
    steps.run(
        "bench",
        _cli(
            "bench",
            "--config",
            REPO / "configs" / "fast.yaml",
            "--out",
            out / "bench",
            "--compile",
            "off,on",
            "--precision",
            "bf16",
            "--channels-last",
            "on",
            "--loaders",
            loaders,
            *shape,
            *data_args,
            *tiny,
            f"data.workers={min(8, os.cpu_count() or 1)}",
        ),
        420,
    )
    if steps.run(
        "profile",
        _cli(
            "bench",
            "--config",
            REPO / "configs" / "fast.yaml",
            "--out",
            out / "profile-bench",
            "--no-baseline",
            "--precision",
            "bf16",
            "--channels-last",
            "on",
            "--batch-sizes",
            "64" if args.dry_run else "512",
            "--profile",
            *(["--warmup", "1", "--steps", "2", "--repeats", "1"] if args.dry_run else []),
            *tiny,
        ),
        300,
    ):
        steps.results[-1].update(_profile_check(out / "profile-bench", cuda=bool(info["gpus"])))
    if have_data:
        epoch = ["train.epochs=1"] + (
            ["train.max_steps=4", "train.batch_size=64", "run.compile=false"] if args.dry_run else []
        )
        if steps.run(
            "epoch",
            _cli(
                "train",
                "--config",
                REPO / "configs" / "fast.yaml",
                "--out",
                out / "fast-1epoch",
                "--overwrite",
                *data_args,
                *epoch,
                *tiny,
                "run.progress=false",
            ),
            240,
        ):
            steps.results[-1]["last_line"] = _accuracy_line(out / "fast-1epoch")
    if args.full and have_data:
        short = ["train.max_steps=4", "run.compile=false"] if args.dry_run else []
        # airbench94 first (seconds on a GPU): timed to this copy's 90% (docs/reproducing.md)
        airbench = ["eval.target_acc=0.90"] + (["train.batch_size=64", "eval.tta=none"] if args.dry_run else [])
        for name, config, extra in (
            ("airbench94", "airbench94.yaml", airbench),
            ("paper-60-epochs", "seed.yaml", []),
            ("fast-full", "fast.yaml", []),
        ):
            if steps.run(
                name,
                _cli(
                    "train",
                    "--config",
                    REPO / "configs" / config,
                    "--out",
                    out / name,
                    "--overwrite",
                    *data_args,
                    *short,
                    *tiny,
                    *extra,
                    "run.progress=false",
                ),
                4 * 3600,
            ):
                steps.results[-1]["last_line"] = _accuracy_line(out / name)
    return _report(out, info, steps.results)


def _report(out: Path, info: dict, results: list[dict]) -> int:
    gpus = ", ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in info["gpus"]) or "no GPU"
    lines = [
        f"# gpu-check, {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"{gpus}; driver {info['driver']}; torch {info['torch']}, CUDA {info['cuda']}, "
        f"cuDNN {info['cudnn']}; FFCV {info['ffcv']}; DeepSpeed {info['deepspeed']}",
        "",
        "| step | result | wall s | last line |",
        "|---|---|---:|---|",
    ]
    for r in results:
        result = "ok" if r["rc"] == 0 else r["rc"] if r["rc"] == "skipped" else f"failed ({r['rc']})"
        lines.append(f"| {r['step']} | {result} | {r['wall_s']} | {r['last_line'].replace('|', '/')} |")
    bench = out / "bench" / "bench.md"
    if bench.is_file():
        lines += ["", bench.read_text().strip()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"env": info, "steps": results}, indent=1))
    print("\n".join(lines))
    print(f"\nwritten {out / 'report.md'}")
    return 0 if all(r["rc"] in (0, "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
