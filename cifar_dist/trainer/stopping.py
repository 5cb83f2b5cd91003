"""Why a run stops (``StopReason``), and the stop requests from outside it: SIGUSR1 / SIGTERM
(Slurm preemption), SIGINT (Ctrl-C) or a STOP file in the run directory."""

from __future__ import annotations

import enum
import signal
from pathlib import Path


class StopReason(enum.Enum):
    FINISHED = "finished"  # train.epochs or train.max_steps done
    REQUESTED = "requested by a callback"  # run.request_stop()
    TARGET = "eval.target_acc reached"  # eval.stop_at_target
    SIGNAL = "signal"  # SIGTERM, SIGUSR1 (Slurm preemption), SIGINT (Ctrl-C)
    STOP_FILE = "STOP file"  # a file named STOP in the run directory

    @property
    def preempts(self) -> bool:
        """The run stops where it stands, to be resumed: no final evaluation, no results."""
        return self in (StopReason.SIGNAL, StopReason.STOP_FILE)


class StopRequest:
    """The run's signal handlers (what a signal does in each ``phase``: docs/runs.md) and the STOP file."""

    def __init__(self, say=None) -> None:
        self.stop_file: Path | None = None  # set by the trainer on rank 0 of a run with a directory
        self.signalled: str | None = None
        self.say = say
        self.phase = "start"
        self._old: dict = {}
        self._depth = 0

    def __enter__(self):
        """Install the handlers (entered again, as the loop does inside the run: nothing more)."""
        self._depth += 1
        if self._depth == 1:
            for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and (self.phase == "start" or self.signalled == "SIGINT"):
            raise KeyboardInterrupt
        self.signalled = name
        if self.say is None:
            return
        if self.phase == "finish":
            again = "; press Ctrl-C again to abort at once (--resume then evaluates)" if name == "SIGINT" else ""
            self.say(f"cifar-dist: {name}: training has ended; writing the results first{again}")
        elif signum == signal.SIGINT:
            self.say(
                "cifar-dist: Ctrl-C: stopping at the next checkpointable step (within 10 steps); "
                "press Ctrl-C again to abort at once"
            )

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old = {}

    def requested(self) -> bool:
        """A signal arrived, or the STOP file exists."""
        return self.signalled is not None or bool(self.stop_file and self.stop_file.exists())

    @property
    def reason(self) -> str:
        return self.signalled or "STOP file"
