"""`cifar-dist doctor`: what this machine offers cifar_dist, the first thing to paste into a bug report."""

from __future__ import annotations

import platform
import shutil
import sys
from importlib import metadata

import torch

import cifar_dist
from cifar_dist.config.loading import load_config, resolve_data_root
from cifar_dist.data.cifar import FOLDER, MD5, file_digest
from cifar_dist.runtime.hardware import bf16_speedup, cpu_flags, cpu_model, has_bf16_units
from cifar_dist.trainer.precision import CpuBf16, resolve_precision


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[tuple[str, str]]:

    rows = [("CUDA available", f"yes, CUDA {torch.version.cuda}" if torch.cuda.is_available() else "no")]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cc = (p.major, p.minor)
        rows.append(
            (
                f"GPU {i}",
                f"{p.name}, compute capability {p.major}.{p.minor}, "
                f"{p.total_memory / 2**30:.0f} GiB, bf16 {'yes' if cc >= (8, 0) else 'no (slow)'}, "
                f"TF32 {'yes' if cc >= (8, 0) else 'no'}",
            )
        )

    units = has_bf16_units(cpu_flags())
    speedup = bf16_speedup()
    auto, _ = resolve_precision("auto", None, CpuBf16(units, lambda: speedup))
    rows.append(
        (
            "CPU",
            f"{cpu_model()}, {torch.get_num_threads()} threads, bf16 units "
            f"{'yes' if units else 'no'}, bf16 {_times(speedup)} fp32 here (probe); "
            f"run.precision=auto picks {auto} on this CPU",
        )
    )
    return rows


def _times(speedup: float) -> str:
    return f"{speedup:.1f}x faster than" if speedup >= 1 else f"{1 / speedup:.1f}x slower than"


def _slurm() -> tuple[str, str]:
    """Which Slurm commands exist, and whether a controller answers (sinfo): sbatch alone proves nothing."""
    import subprocess

    found = {cmd: shutil.which(cmd) for cmd in ("sbatch", "srun", "scontrol", "sinfo")}
    line = ", ".join(f"{c} {'yes' if p else 'no'}" for c, p in found.items())
    if not found["sinfo"]:
        return "Slurm", line
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%P %a %D"], capture_output=True, text=True, timeout=10)
        answer = (
            f"answers ({len(res.stdout.split()) // 3 or 0} partition(s))"
            if res.returncode == 0
            else "does not answer: " + ((res.stderr or res.stdout).strip().splitlines() or ["?"])[-1][:120]
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        answer = f"does not answer: {type(e).__name__}"
    return "Slurm", f"{line}; controller {answer}"


def _data(config: str | None) -> tuple[str, str]:

    cfg = load_config(config)
    if cfg.data.synthetic:
        return "CIFAR-10", "synthetic (data.synthetic: true): no files needed"
    folder = resolve_data_root(cfg) / FOLDER
    missing = [n for n in MD5 if not (folder / n).is_file()]
    if missing:
        return "CIFAR-10", f"missing in {folder} ({len(missing)} files); run `cifar-dist prepare`"
    differ = [n for n in MD5 if file_digest(folder / n, "md5") != MD5[n]]
    kind = "the official files" if not differ else "a rebuilt or modified copy (md5 differs from the official)"
    return "CIFAR-10", f"{folder}: {kind}"


def doctor(config: str | None = None) -> list[tuple[str, str]]:

    rows = [
        ("cifar_dist", cifar_dist.__version__),
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
    ]
    rows += [(name, _version(name)) for name in ("torch", "accelerate", "deepspeed", "ffcv", "torchvision", "numpy")]
    rows += _devices()
    rows.append(_data(config))
    rows.append(_slurm())
    return rows


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
