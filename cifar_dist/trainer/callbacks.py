"""Callbacks: the public extension point of the training loop.

    run:
      callbacks: ["mypackage.hooks:EarlyStop"]   # imported at start, built with no arguments

A callback is a class with any of these methods (``Callback`` gives no-op defaults):

    on_train_start(run)               before the first step; ``run`` is the loop (``trainer.loop.Trainer``):
                                      run.cfg, run.state, run.rank, run.world, run.run_dir,
                                      run.model, run.optimizer, run.request_stop()
    on_step_start(step)               before optimizer step ``step`` (global, from 0)
    on_loss(loss, step) -> loss       each micro-batch's loss before backward; returns the loss to use
                                      (None: the loss as it was)
    on_step_end(step, metrics)        after the step; metrics: "lr", and "train_loss" (the epoch's
                                      running mean) on the steps where the loop read the device
    on_checkpoint_staged(path, step)  a checkpoint is written to ``path``, not yet committed
    on_epoch_end(row)                 the epoch's metrics row (with test_acc when it was evaluated)
    on_train_end(summary)             the run's summary (summary.json's contents)

Every rank runs every callback. What changes the run (the loss ``on_loss`` returns,
a ``run.request_stop()``) must be the same on every rank, or the ranks' collectives fall
out of step; decide from values every rank shares (the metrics rows and the summary are
the same on all ranks). A requested stop ends the run after the current step: it is
evaluated, checkpointed and summarized like any finished run. Hooks get host values the
loop already has, so a callback adds no host-device synchronization unless it makes one.

A callback with state that a resumed run must continue defines both of

    state_dict() -> state             JSON-able (numbers, strings, lists, dicts), asked on rank 0
                                      at every checkpoint (after on_step_end / on_epoch_end of
                                      its step)
    load_state_dict(state)            on --resume, on every rank, before on_train_start

Every checkpoint then holds ``callbacks.json``: each stateful callback's state under its
name (its ``run.callbacks`` spec, ``package.module:Class``; the class's ``module:qualname``
for one passed in code or built in; ``#2``, ``#3`` on repeats), covered by the manifest.
A callback whose name is not in the checkpoint starts fresh; state of a callback no longer
configured is ignored. Keep the state the same on every rank (rank 0's is restored to all).
"""

from __future__ import annotations

import json
from pathlib import Path

from cifar_dist.config.plugins import import_object
from cifar_dist.errors import CheckpointError, ConfigError
from cifar_dist.trainer.stopping import StopReason


class Callback:
    """Base class with every hook doing nothing; override the ones you need."""

    def on_train_start(self, run) -> None: ...
    def on_step_start(self, step: int) -> None: ...
    def on_loss(self, loss, step: int):
        return loss

    def on_step_end(self, step: int, metrics: dict) -> None: ...
    def on_checkpoint_staged(self, path, step: int) -> None: ...
    def on_epoch_end(self, row: dict) -> None: ...
    def on_train_end(self, summary: dict) -> None: ...


STATE_FILE = "callbacks.json"


def callback_name(callback) -> str:
    """A callback's name when it has no ``run.callbacks`` spec: ``module:qualname`` of its class."""
    cls = type(callback)
    return f"{cls.__module__}:{cls.__qualname__}"


class Callbacks:
    """The run's callbacks, called in the configured order; a hook a callback lacks is skipped.
    ``names``: what each one's state is saved under (default: ``callback_name``)."""

    def __init__(self, items=(), names=None):
        self.items = list(items)
        names = list(names) if names is not None else [callback_name(c) for c in self.items]
        assert len(names) == len(self.items)
        seen: dict[str, int] = {}
        self.names = []
        for name in names:  # the same callback twice: name#2, name#3
            seen[name] = seen.get(name, 0) + 1
            self.names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")

    def plus(self, items) -> Callbacks:
        """These callbacks, then ``items`` (named by their class)."""
        return Callbacks([*self.items, *items], [*self.names, *(callback_name(c) for c in items)])

    def _stateful(self):
        return [(n, c) for n, c in zip(self.names, self.items) if callable(getattr(c, "state_dict", None))]

    def save_state(self, folder: Path) -> None:
        """``callbacks.json`` in checkpoint ``folder`` when any callback has state (rank 0)."""
        stateful = self._stateful()
        if not stateful:
            return
        states = {}
        for name, callback in stateful:
            try:
                states[name] = json.loads(json.dumps(callback.state_dict()))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"run.callbacks: {name}: state_dict() returned what JSON cannot hold ({e})") from None
        (Path(folder) / STATE_FILE).write_text(json.dumps(states, indent=1, sort_keys=True))

    def load_state(self, folder: Path) -> None:
        """Give each stateful callback its state from checkpoint ``folder`` (every rank)."""
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            return
        try:
            states = json.loads(path.read_text())
            assert isinstance(states, dict)
        except (OSError, ValueError, AssertionError):
            raise CheckpointError(f"{path}: unreadable (expected a JSON object of callback states)") from None
        for name, callback in zip(self.names, self.items):
            load = getattr(callback, "load_state_dict", None)
            if name in states and callable(load):
                load(states[name])

    def _each(self, hook: str, *args) -> None:
        for callback in self.items:
            method = getattr(callback, hook, None)
            if callable(method):
                method(*args)

    def on_train_start(self, run) -> None:
        self._each("on_train_start", run)

    def on_step_start(self, step: int) -> None:
        self._each("on_step_start", step)

    def on_loss(self, loss, step: int):
        """Each callback's ``on_loss`` in turn; one that returns None leaves the loss as it was."""
        for callback in self.items:
            method = getattr(callback, "on_loss", None)
            if callable(method):
                changed = method(loss, step)
                loss = loss if changed is None else changed
        return loss

    def on_step_end(self, step: int, metrics: dict) -> None:
        self._each("on_step_end", step, metrics)

    def on_checkpoint_staged(self, path, step: int) -> None:
        self._each("on_checkpoint_staged", path, step)

    def on_epoch_end(self, row: dict) -> None:
        self._each("on_epoch_end", row)

    def on_train_end(self, summary: dict) -> None:
        self._each("on_train_end", summary)


def load_callbacks(specs) -> Callbacks:
    """Import and build ``run.callbacks``; a bad name is a ConfigError naming it."""

    items = []
    for spec in specs:
        cls = import_object(spec, "run.callbacks")
        try:
            items.append(cls())
        except Exception as e:
            raise ConfigError(f"run.callbacks: {spec!r} could not be built: {type(e).__name__}: {e}") from None
    return Callbacks(items, specs)


def time_to_target(history: list[dict], target: float) -> dict:
    """``time_to_target_s`` and ``epochs_to_target`` from the metrics rows (None when not reached;
    {} when no target is set). An interrupted epoch counts with its fraction of steps."""
    if not target:
        return {}
    elapsed = 0.0
    for row in history:
        elapsed += row["epoch_time_s"]
        if row.get("test_acc") is not None and row["test_acc"] >= target:
            return {"target_acc": target, "time_to_target_s": elapsed, "epochs_to_target": row["epoch"]}
    return {"target_acc": target, "time_to_target_s": None, "epochs_to_target": None}


class StopAtTarget(Callback):
    """Ends the run after the first evaluation at or above the target (same on every rank:
    the evaluation is). Stateless: each epoch's row decides alone, and a run it stopped has
    ended, so a resume has nothing of it to continue."""

    def __init__(self, target: float):
        self.target = target

    def on_train_start(self, run):
        self.run = run

    def on_epoch_end(self, row: dict) -> None:
        if row.get("test_acc") is not None and row["test_acc"] >= self.target:
            self.run.request_stop(StopReason.TARGET)
