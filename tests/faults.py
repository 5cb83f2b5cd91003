"""Faults the reliability tests inject into real runs: a cifar_dist callback.

Installed like any user callback, ``run.callbacks=[faults:Inject]`` with tests/ on
PYTHONPATH (conftest.fault_args / fault_env), and configured by FAULT_INJECT=KIND@STEP[:RANK]:

    raise     an exception at step STEP
    kill      SIGKILL before step STEP
    killsave  SIGKILL half-way through writing the checkpoint of step STEP
    nan       a NaN loss at step STEP
    overflow  a finite loss whose gradients overflow (what fp16 loss scaling absorbs)
    wait      hold at step STEP until a stop is requested (preemption tests signal then)
    sigint    SIGINT (what Ctrl-C sends) before step STEP
    sigint2   two SIGINTs before step STEP (Ctrl-C pressed twice)
    fill      fill the run directory's file system before step STEP (conftest.small_disk: a real
              full disk for every later write)
    fillend   the same when training has ended, before the results are written (STEP unused)
    killend   SIGKILL when training has ended and the final evaluation is done, before the
              results are written (STEP unused)
    termend   SIGTERM there (what a scheduler sends to preempt the job)
    intend    SIGINT there (Ctrl-C), and intend2 two of them (Ctrl-C pressed twice)

RANK limits the fault to one rank. A fault fires in the first attempt only: a process
restarted by torchrun (--max-restarts) runs clean.
"""

from __future__ import annotations

import os
import signal
import time

from cifar_dist.trainer.callbacks import Callback

VAR = "FAULT_INJECT"
KINDS = (
    *("raise", "kill", "killsave", "nan", "overflow", "wait", "sigint", "sigint2", "fill"),
    *("fillend", "killend", "termend", "intend", "intend2"),
)
AT_END = {"killend": [signal.SIGKILL], "termend": [signal.SIGTERM], "intend": [signal.SIGINT]}
AT_END["intend2"] = AT_END["intend"] * 2


def parse(spec: str) -> tuple[str, int, int | None]:
    """``kill@12:1`` -> ("kill", 12, 1)."""
    kind, _, where = spec.partition("@")
    step, _, rank = where.partition(":")
    if kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit()):
        raise ValueError(f"{VAR}={spec!r}: expected {'|'.join(KINDS)}@STEP[:RANK]")
    return kind, int(step), int(rank) if rank else None


class Inject(Callback):
    def __init__(self):
        spec = os.environ.get(VAR)
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
        self.fault = parse(spec) if spec and first_attempt else None
        self.run = None

    def on_train_start(self, run) -> None:
        self.run = run

    def _here(self, step: int, *kinds) -> bool:
        if self.fault is None:
            return False
        kind, at, rank = self.fault
        return kind in kinds and step == at and (rank is None or rank == self.run.rank)

    def on_step_start(self, step: int) -> None:
        step -= 1  # a spec's STEP counts the steps done before it; the loop numbers steps from 1
        if self._here(step, "raise"):
            raise RuntimeError(f"injected fault at step {step}")
        if self._here(step, "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._here(step, "fill"):
            fill(self.run.run_dir)
        if self._here(step, "sigint", "sigint2"):
            os.kill(os.getpid(), signal.SIGINT)
            if self._here(step, "sigint2"):
                os.kill(os.getpid(), signal.SIGINT)
        if self._here(step, "wait"):
            print(f"cifar-dist test: rank {self.run.rank}: waiting for a stop request at step {step}", flush=True)
            deadline = time.time() + 900
            while not self.run.stop.requested() and time.time() < deadline:
                time.sleep(0.1)

    def on_train_end(self, summary) -> None:
        kind = self.fault[0] if self.fault is not None else None
        if kind == "fillend":
            fill(self.run.run_dir)
        for sig in AT_END.get(kind, []):
            os.kill(os.getpid(), sig)

    def on_loss(self, loss, step: int):
        step -= 1  # as in on_step_start
        if self._here(step, "nan"):
            return loss * float("nan")
        if self._here(step, "overflow"):  # the same value, gradients 1e30 times larger
            scaled = loss * 1e30
            return loss.detach() + (scaled - scaled.detach())
        return loss

    def on_checkpoint_staged(self, path, step: int) -> None:
        if self._here(step, "killsave"):  # a crash half-way through the write
            weights = path / "model.safetensors"
            if weights.exists():
                os.truncate(weights, weights.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)


def fill(folder) -> int:
    """Write a filler file in ``folder`` until its file system has no space left; returns its size."""
    written = 0
    with open(os.path.join(str(folder), "filler"), "wb") as f:
        chunk = b"\0" * (1 << 16)
        try:
            while True:
                written += f.write(chunk)
                f.flush()
        except OSError:
            pass
    return written
