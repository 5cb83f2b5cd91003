"""What each epoch row says about the hardware: FLOP/s, MFU and peak memory.

The same FLOP count (``model.layer_table.count_flops``, forward + backward per image) and
the same peak table (``runtime.hardware.device_peak``: the datasheet on GPUs, a bounded and
cached matrix-product probe elsewhere) as ``cifar-dist bench``, for the precision the run
trains in. Both are found once, before the first step, on a fresh copy of the model and
with the random generators put back, so the run trains exactly as it would without them.
The figures are read at the epoch boundary, where the loop already waits for the device:
nothing is added to the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cifar_dist.distributed.collectives import share_from_main
from cifar_dist.model.layer_table import count_flops
from cifar_dist.model.resnet import build_model
from cifar_dist.runtime.hardware import device_peak, mfu, peak_memory_bytes
from cifar_dist.runtime.provenance import device_name


@dataclass
class Throughput:
    flops_per_image: float | None  # forward + backward
    peak_flops: float | None  # per device, in the run's precision
    peak_source: str

    @classmethod
    def measure(cls, cfg, device: torch.device) -> Throughput:
        """Rank 0 counts and looks up; every rank takes its figures (so the rows agree)."""

        def find():
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                try:
                    flops = count_flops(build_model(cfg.model), train=True)
                except Exception:  # a user's model the counter cannot trace: MFU is then unknown
                    flops = None
                tf32 = cfg.run.tf32 and not cfg.run.deterministic
                peak, source = device_peak(device, device_name(device), cfg.run.precision, tf32)
            return flops, peak, source

        return cls(*share_from_main(find))

    def figures(self, images_per_s_per_device: float) -> dict:
        """``tflops_per_s`` and ``mfu`` per device (None where the FLOPs or the peak are unknown)."""
        if not self.flops_per_image:
            return {"tflops_per_s": None, "mfu": None}
        achieved = images_per_s_per_device * self.flops_per_image
        return {"tflops_per_s": achieved / 1e12, "mfu": mfu(achieved, self.peak_flops)}


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory, in GB (1e9 bytes): on CUDA the most allocated since the last
    call (so each epoch row has its own), elsewhere the process's peak resident set so far (the
    kernel keeps no per-epoch figure)."""
    peak = peak_memory_bytes(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return peak / 1e9
