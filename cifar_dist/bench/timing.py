"""The benchmark's clock: many steps between two device synchronizations, medians over repeats."""

from __future__ import annotations

import statistics
import time

import torch

from cifar_dist.runtime.hardware import peak_memory_bytes


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def time_steps(step_fn, next_batch, clock, warmup: int, steps: int, repeats: int) -> dict:
    """``warmup`` untimed steps, then ``repeats`` x ``steps`` timed ones: per repeat its wall time,
    mean step time and host time waiting in ``next_batch``. The device is synchronized only at the
    start and end of each repeat: throughput, as in training (a sync per step measures latency)."""
    for _ in range(warmup):
        step_fn(next_batch())
    last = clock.now()
    step_times, data_times, repeat_times = [], [], []
    for _ in range(repeats):
        waited = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next_batch()
            waited += time.perf_counter() - t0
            step_fn(batch)
        end = clock.now()
        repeat_times.append(end - last)
        step_times.append((end - last) / steps)
        data_times.append(waited)
        last = end
    return {"repeat_times": repeat_times, "step_times": step_times, "data_times": data_times}


def peak_memory(device) -> float:
    """The process's peak memory in MiB (``runtime.hardware.peak_memory_bytes``)."""
    return peak_memory_bytes(device) / 2**20


def forever(loader):
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        yield from loader.iter_epoch(epoch)
        epoch += 1


def figures(timing: dict, steps: int, global_batch: int, world: int, peak_mib: float) -> dict:
    per_repeat = [steps * global_batch / t for t in timing["repeat_times"]]
    images_per_s = statistics.median(per_repeat)
    return {
        "world_size": world,
        "global_batch": global_batch,
        "images_per_s": images_per_s,
        "images_per_s_per_device": images_per_s / world,
        "step_time_median_s": statistics.median(timing["step_times"]),
        "step_time_p90_s": percentile(timing["step_times"], 0.9),
        "data_wait_share": sum(timing["data_times"]) / max(sum(timing["repeat_times"]), 1e-12),
        "peak_memory_mib": peak_mib,
        "repeats_images_per_s": per_repeat,
    }


class Clock:
    """Wall time that synchronizes the device before it is read."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
