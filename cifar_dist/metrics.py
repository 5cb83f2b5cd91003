"""Metrics sinks (JSONL, TensorBoard) and an honest clock. Rank 0 writes."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


class Clock:
    """Wall time that synchronizes the device before it is read."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


class MetricsLog:
    """One flat dict per epoch into ``metrics.jsonl`` and, when installed, TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, history: list[dict] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.history = list(history or [])
        # A resumed run rewrites the file from the checkpoint's history, so an
        # epoch logged after that checkpoint never appears twice.
        self._rewrite()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self.tb = None

    def _rewrite(self) -> None:
        tmp = self.path.with_name(".tmp-metrics.jsonl")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        tmp.replace(self.path)

    def log(self, row: dict) -> None:
        self.history.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch" and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
