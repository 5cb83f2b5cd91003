"""Callbacks: the public extension point of the training loop (``run.callbacks``; docs/extending.md)."""

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
    """The run's callbacks in order; ``names``: what each one's state is saved under in callbacks.json."""

    collective = False

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

    def save(self, folder: Path) -> None:
        """``callbacks.json`` in checkpoint ``folder`` when any callback has state (rank 0)."""
        states = {}
        for name, callback in zip(self.names, self.items):
            if not callable(getattr(callback, "state_dict", None)):
                continue
            try:
                states[name] = json.loads(json.dumps(callback.state_dict()))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"run.callbacks: {name}: state_dict() returned what JSON cannot hold ({e})") from None
        if states:
            (Path(folder) / STATE_FILE).write_text(json.dumps(states, indent=1, sort_keys=True))

    def load(self, folder: Path) -> None:
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

    def _hooks(self, hook: str):
        return [method for c in self.items if callable(method := getattr(c, hook, None))]

    def call(self, hook: str, *args) -> None:
        """Each callback's ``hook`` in the configured order; a callback without it is skipped."""
        for method in self._hooks(hook):
            method(*args)

    def on_loss(self, loss, step: int):
        """Each callback's ``on_loss`` in turn; one that returns None leaves the loss as it was."""
        for method in self._hooks("on_loss"):
            changed = method(loss, step)
            loss = loss if changed is None else changed
        return loss


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


class StopAtTarget(Callback):
    """Ends the run after the first evaluation at or above the target; stateless (such a run has ended)."""

    def __init__(self, target: float):
        self.target = target

    def on_train_start(self, run):
        self.run = run

    def on_epoch_end(self, row: dict) -> None:
        if row.get("test_acc") is not None and row["test_acc"] >= self.target:
            self.run.request_stop(StopReason.TARGET)
