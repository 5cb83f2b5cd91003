"""Where training stands: what every checkpoint's state.json holds, read back only through
``parse_state``, which names the file and key of anything invalid."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cifar_dist.errors import CheckpointError

LOSS_UNIT = 2.0**-24  # the training-loss sums are whole multiples of this (see trainer.epoch.EpochTotals)


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # the next step to run within it
    global_step: int = 0  # optimizer steps done
    skipped_steps: int = 0  # fp16 steps skipped by the loss scaler
    history: list = field(default_factory=list)  # one metrics row per finished epoch
    partial: dict = field(default_factory=dict)  # the interrupted epoch's sums over ALL ranks
    scaler: dict = field(default_factory=dict)  # fp16 loss-scaler state
    world_size: int = 0  # processes of the run that wrote this state (0: not recorded)
    segments: list = field(default_factory=list)  # [{"world_size", "from_step"}]: each (re)start of the run
    ended: str = ""  # why training ended at this state, when it did (a StopReason's value; "" while it goes on)


# TrainState.ended: the values of trainer.stopping.StopReason that end a run (not a preemption)
ENDINGS = ("", "finished", "requested by a callback", "eval.target_acc reached")
_INT = {"epoch", "step_in_epoch", "global_step", "skipped_steps", "world_size"}
_PARTIAL = {"loss_units", "correct", "count"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_state(data, source) -> TrainState:
    """A TrainState from a state.json's parsed contents, else a CheckpointError."""

    def invalid(what):
        return CheckpointError(f"{source}: {what}")

    if not isinstance(data, dict):
        raise invalid(f"expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainState)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise invalid(f"unknown key {str(unknown[0])[:40]!r}")
    for key in _INT & set(data):
        least = 1 if key == "world_size" else 0
        if not _is_int(data[key]) or data[key] < least:
            raise invalid(f"{key}: expected a whole number >= {least}, got {str(data[key])[:40]!r}")
    for key in ("history", "segments"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(r, dict) for r in data[key])):
            raise invalid(f"{key}: expected a list of objects")
    for row in data.get("history", []):
        if not _is_int(row.get("epoch")) or not all(isinstance(v, (int, float, type(None))) for v in row.values()):
            raise invalid("history: a row without a whole epoch number, or with a value that is not a number")
    for seg in data.get("segments", []):
        if set(seg) != {"world_size", "from_step"} or not all(_is_int(v) and v >= 0 for v in seg.values()):
            raise invalid("segments: expected objects of world_size and from_step")
    partial = data.get("partial", {})
    if partial != {} and not (
        isinstance(partial, dict) and set(partial) == _PARTIAL and all(_is_int(v) and v >= 0 for v in partial.values())
    ):
        raise invalid("partial: expected {} or whole numbers loss_units, correct and count")
    if not isinstance(data.get("scaler", {}), dict):
        raise invalid("scaler: expected an object")
    if data.get("ended", "") not in ENDINGS:
        raise invalid(f"ended: expected one of {', '.join(map(repr, ENDINGS))}, got {str(data['ended'])[:40]!r}")
    state = TrainState(**data)
    if state.partial and state.partial["correct"] > state.partial["count"]:
        raise invalid("partial: more correct predictions than images")
    return state
