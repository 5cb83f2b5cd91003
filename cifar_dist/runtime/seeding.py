"""Seeding, deterministic algorithms and TF32: the switches that decide a run's numerics."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def set_determinism(deterministic: bool, compiling: bool = False) -> None:
    """Deterministic algorithms when asked, else cudnn's fastest. Without torch.compile only the
    eager flag is set: the public call imports the compiler stack (16 s on a slow CPU)."""
    if deterministic:
        # cuBLAS needs this before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if compiling:
            torch.use_deterministic_algorithms(True, warn_only=False)
        else:
            torch._C._set_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def set_tf32(allowed: bool) -> None:
    """TF32 tensor cores for fp32 matrix products and convolutions on GPUs (or IEEE fp32). Through
    the flags every PyTorch version reads: the per-operator ones of 2.9+ follow them, whereas setting
    only those leaves a mix that torch.export and the legacy getters refuse to read."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def apply_tf32(run_cfg) -> bool:
    """``run.tf32`` on a GPU, off under ``run.deterministic``; whether fp32 now runs on TF32 cores."""
    if not torch.cuda.is_available():
        return False
    allowed = run_cfg.tf32 and not run_cfg.deterministic
    set_tf32(allowed)
    return allowed


def seed_everything(seed: int) -> None:
    """Seed the global generators, which only weight initialization uses."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
