"""Where a result came from: the code's commit, the library versions and the device's name."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

from cifar_dist.runtime.hardware import cpu_model


@functools.cache
def git_sha() -> str:
    """The commit of the running code, read once: a commit made during a run is not its summary's."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    """Versions of the stack, read from package metadata (nothing optional is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "accelerate", "deepspeed", "ffcv", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
