"""`cifar-dist doctor`: what this machine offers cifar_dist, one fact per line, then accelerate's
default config and torch.utils.collect_env's report: one paste for a bug report (docs/runs.md).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import threading
from importlib import metadata
from pathlib import Path

import torch
import yaml

import cifar_dist
from cifar_dist.config.loading import load_config, resolve_data_root
from cifar_dist.data.cifar import FOLDER, MD5, file_digest
from cifar_dist.runtime.hardware import cpu_flags, cpu_model, has_bf16_units, resolve_precision

# collect_env runs nvidia-smi, pip, gcc, ... with no timeout of its own: a stuck driver would hang doctor.
COLLECT_ENV_TIMEOUT_S = 60.0


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
    auto, _ = resolve_precision("auto", None, units)
    rows.append(
        (
            "CPU",
            f"{cpu_model()}, {torch.get_num_threads()} threads, bf16 units "
            f"{'yes (AMX or AVX-512 bf16)' if units else 'no (AVX2 alone: bf16 is several times slower)'}; "
            f"run.precision=auto picks {auto} on this CPU",
        )
    )
    return rows


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
    mismatched = [n for n in MD5 if file_digest(folder / n, "md5") != MD5[n]]
    kind = "the official files" if not mismatched else "a rebuilt or modified copy (md5 differs from the official)"
    return "CIFAR-10", f"{folder}: {kind}"


def _accelerator() -> str:
    """The device type torch would train on here (what `accelerate env` calls the PyTorch accelerator)."""
    try:
        device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    except AttributeError:  # torch < 2.6 has no torch.accelerator
        device = torch.device("cuda") if torch.cuda.is_available() else None
    return device.type if device is not None else "none (CPU only)"


def _memory() -> str:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every system names these
        return "unknown"
    return f"{total / 2**30:.1f} GiB"


def accelerate_config_path() -> Path | None:
    """Where `accelerate launch` looks for its default config (HF_HOME moves it), or None."""
    try:
        from accelerate.commands.config.config_args import default_config_file
    except ImportError:
        return None
    return Path(default_config_file)


def accelerate_config(path: Path | None) -> tuple[str, list[str]]:
    """The doctor line for accelerate's default config and, if there is one, its settings."""
    if path is None:
        return "location unknown to this accelerate version", []
    if not path.is_file():
        return f"none at {path} (accelerate launch without --config_file uses its own defaults)", []
    try:
        data = yaml.safe_load(path.read_text())  # YAML, or the older JSON, which YAML reads too
    except (OSError, yaml.YAMLError) as e:
        return f"{path}: unreadable ({type(e).__name__})", []
    if not isinstance(data, dict):
        return f"{path}: not a mapping of settings", []
    return str(path), [f"  {k}: {v}" for k, v in data.items()]


def torch_env(timeout_s: float | None = None) -> str:
    """torch.utils.collect_env's report, or one line saying why not (it failed, or ran past ``timeout_s``)."""
    limit = COLLECT_ENV_TIMEOUT_S if timeout_s is None else timeout_s
    result: dict[str, str] = {}

    def collect() -> None:
        try:
            from torch.utils.collect_env import get_pretty_env_info

            result["text"] = get_pretty_env_info()
        except Exception as e:  # whatever breaks in it must not hide the rest of doctor's report
            result["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"

    worker = threading.Thread(target=collect, name="collect_env", daemon=True)
    worker.start()
    worker.join(limit)
    if "text" in result:
        return result["text"].rstrip()
    if "error" in result:
        return f"not available: {result['error']}"
    return f"not available: not finished after {limit:g} s (a command it runs hangs)"


def doctor(config: str | None = None) -> list[tuple[str, str]]:
    rows = [
        ("cifar_dist", cifar_dist.__version__),
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
    ]
    rows += [(name, _version(name)) for name in ("torch", "accelerate", "deepspeed", "ffcv", "torchvision", "numpy")]
    rows += _devices()
    rows += [
        ("accelerator", _accelerator()),
        ("memory", _memory()),
        ("accelerate command", shutil.which("accelerate") or "not on PATH"),
        ("accelerate config", accelerate_config(accelerate_config_path())[0]),
    ]
    rows.append(_data(config))
    rows.append(_slurm())
    return rows


def report(config: str | None = None) -> str:
    """All that doctor prints: the facts, then accelerate's default config and collect_env's report."""
    text = format_rows(doctor(config))
    path = accelerate_config_path()
    settings = accelerate_config(path)[1]
    if settings:
        text += f"\n\naccelerate default config ({path}):\n" + "\n".join(settings)
    return text + "\n\ntorch.utils.collect_env:\n" + torch_env()


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
