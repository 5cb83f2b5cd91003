"""Where training stands: what every checkpoint's state.json holds."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    epoch: int = 0            # the epoch in progress
    step_in_epoch: int = 0    # the next step to run within it
    global_step: int = 0      # optimizer steps done
    skipped_steps: int = 0    # fp16 steps skipped by the loss scaler
    history: list = field(default_factory=list)  # one metrics row per finished epoch
    partial: dict = field(default_factory=dict)  # training-loss sums of an interrupted epoch
    scaler: dict = field(default_factory=dict)   # fp16 loss-scaler state
