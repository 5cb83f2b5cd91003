"""One epoch as it runs: its running sums on the device, its clock and progress bar, its row, and what
the row says about the hardware (FLOP/s, MFU, peak memory: read where the loop waits anyway)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cifar_dist.distributed.collectives import all_reduce_max, all_reduce_sum, share_from_main
from cifar_dist.model.layer_table import count_flops
from cifar_dist.model.optim import lr_at
from cifar_dist.model.resnet import build_model
from cifar_dist.runtime.hardware import Throughput, device_peak, peak_memory_bytes
from cifar_dist.runtime.provenance import device_name
from cifar_dist.storage.state import LOSS_UNIT, TrainState


@dataclass
class EpochTotals:
    """An epoch's running loss and accuracy sums, on the device. The loss counts whole ``LOSS_UNIT``s:
    integer sums do not depend on their order, so they are the same bits for any process count."""

    loss: torch.Tensor  # int64, units of LOSS_UNIT
    correct: torch.Tensor  # int64
    count: int  # images so far (a host number: the step knows it)

    @classmethod
    def start(cls, device, partial: dict | None = None, carries_partial: bool = True) -> EpochTotals:
        """Zero sums, or state.json's ``partial`` carried by one rank so that the all-reduce counts it once."""
        partial = partial if (partial and carries_partial) else {}
        return cls(
            torch.tensor(int(partial.get("loss_units", 0)), dtype=torch.int64, device=device),
            torch.tensor(int(partial.get("correct", 0)), dtype=torch.int64, device=device),
            int(partial.get("count", 0)),
        )

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.loss += (loss.detach().double() * (target.numel() / LOSS_UNIT)).round().long()
        self.correct += (logits.detach().argmax(1) == target).sum()
        self.count += target.numel()

    def stacked(self) -> torch.Tensor:
        """(loss units, correct, count) in float64: whole numbers below 2^53, summed exactly in any order."""
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.loss.device)
        return torch.stack([self.loss.double(), self.correct.double(), count])

    def over_ranks(self) -> dict:
        """The sums over all ranks, as state.json's ``partial`` holds them (one all-reduce, one read)."""
        loss, correct, count = (int(v) for v in all_reduce_sum(self.stacked()).tolist())
        return {"loss_units": loss, "correct": correct, "count": count}


def measure_throughput(cfg, device: torch.device) -> Throughput:
    """The rows' FLOP/s and MFU figures: rank 0 counts a fresh model's FLOPs (the random generators put
    back) and looks up the peak; every rank takes them, so that the rows agree."""

    def find():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                flops = count_flops(build_model(cfg.model), train=True)
            except Exception:  # a user's model the counter cannot trace: MFU is then unknown
                flops = None
            tf32 = cfg.run.tf32 and not cfg.run.deterministic
            return Throughput(flops, *device_peak(device, device_name(device), cfg.run.precision, tf32))

    return share_from_main(find)


class EpochRun:
    """The epoch in progress: its number, running sums, clock and progress bar."""

    def __init__(self, state: TrainState, steps: int, shard, device, progress, epochs: float):
        self.number, self.steps, self.device, self.world = state.epoch + 1, steps, device, shard.world
        self.totals = EpochTotals.start(device, state.partial, carries_partial=shard.rank == 0)
        self.start, self.steps_run = time.perf_counter(), 0
        self.images = shard.global_batch  # per step: the bar counts images, so it shows images/s
        self.bar = progress(
            total=self.steps * self.images,
            initial=state.step_in_epoch * self.images,
            desc=f"epoch {self.number}/{epochs:g}",
        )

    def advance(self, state: TrainState) -> None:
        state.global_step += 1
        state.step_in_epoch += 1
        self.steps_run += 1
        self.bar.update(self.images)

    def row(self, state: TrainState, train_cfg, throughput: Throughput) -> dict:
        """The epoch's metrics row over all ranks (one host read); memory is the most any process used."""
        elapsed = time.perf_counter() - self.start
        sums = all_reduce_sum(self.totals.stacked())
        peak = peak_memory_bytes(self.device, reset=True) / 1e9  # each epoch its own on CUDA
        memory = all_reduce_max(torch.tensor([peak], device=sums.device, dtype=sums.dtype))
        loss, correct, count, peak_gb = torch.cat([sums, memory]).tolist()
        count = max(count, 1.0)
        images_per_s = self.steps_run * self.images / max(elapsed, 1e-9)
        return {
            "epoch": self.number,
            "step": state.global_step,
            "train_loss": loss * LOSS_UNIT / count,
            "train_acc": correct / count,
            "lr": lr_at(max(state.global_step - 1, 0), train_cfg, self.steps),
            "epoch_time_s": elapsed,
            "images_per_s": images_per_s,
            **throughput.figures(images_per_s / self.world),
            "peak_memory_gb": peak_gb,
            "skipped_steps": state.skipped_steps,
        }


def epoch_line(row: dict) -> str:
    """The console line of an epoch's row."""
    fields = [
        f"epoch {row['epoch']}",
        f"step {row['step']}",
        f"train loss {row['train_loss']:.4f}",
        f"train acc {100 * row['train_acc']:.2f}%",
    ]
    if "test_acc" in row:
        fields += [f"test loss {row['test_loss']:.4f}", f"test acc {100 * row['test_acc']:.2f}%"]
    fields += [f"lr {row['lr']:.3g}", f"{row['epoch_time_s']:.1f} s", f"{row['images_per_s']:.0f} img/s"]
    if row.get("mfu") is not None:
        fields.append(f"MFU {100 * row['mfu']:.1f}%")
    return " | ".join(fields)
