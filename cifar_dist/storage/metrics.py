"""``metrics.jsonl``, the source of truth of a run's epoch rows (rank 0 writes), and its one reader."""

from __future__ import annotations

import json
from pathlib import Path

from cifar_dist.config.schema import flatten
from cifar_dist.distributed.collectives import print0
from cifar_dist.errors import UserError, say
from cifar_dist.storage.files import write_text_atomic
from cifar_dist.storage.trackers import Trackers, tracker_places


class MetricsLog:
    """One flat dict per epoch into ``metrics.jsonl``, then to the run's trackers. The small file is
    rewritten whole (temporary file, rename) at every row: a full disk never leaves it torn."""

    def __init__(self, run_dir: Path, history: list[dict] | None = None, trackers=None, loss_every: int = 0, step=0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.history = list(history or [])
        self.trackers = trackers if trackers is not None else Trackers([], [])
        self.loss_every, self.loss_logged_at = loss_every, step  # run.log_every_steps; the last step sent
        # A resumed run rewrites the file from the checkpoint's history, so an epoch logged
        # after that checkpoint never appears twice. A fresh run writes it at its first row.
        if self.history:
            self._rewrite()

    def _rewrite(self) -> None:
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.history))

    def log(self, row: dict) -> None:
        self.history.append(row)
        self._rewrite()
        self.trackers.log_row(row)

    @classmethod
    def start(cls, run_dir: Path, cfg, step: int, history: list[dict]) -> MetricsLog:
        """The log of a run going on after step ``step`` and the rows ``history``, its trackers started."""
        trackers = Trackers.start(cfg.run.trackers, run_dir, cfg.name, flatten(cfg.to_dict()), step, history)
        if cfg.run.trackers:
            print0(f"trackers: {tracker_places(cfg.run.trackers, run_dir)}")
        return cls(run_dir, history, trackers, cfg.run.log_every_steps, step)

    def log_loss(self, loss: float, step: int) -> None:
        """A running training loss between rows (the rows hold the epoch's), to the trackers only, when
        step ``step`` starts a new ``loss_every`` (the loop calls it at its control reads, no extra one)."""
        if self.loss_every and step // self.loss_every > self.loss_logged_at // self.loss_every:
            self.loss_logged_at = step
            self.trackers.log_loss(loss, step)

    def close(self) -> None:
        self.trackers.close()


def read_metrics(run_dir: Path, warn: bool = True) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (none when it is missing): a torn last line is skipped with a
    warning; any other line that is not a JSON object with a whole ``epoch`` is a UserError."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror or e})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool):
            rows.append(row)
        elif number < len(lines):
            raise UserError(f"{path}: line {number} is not a metrics row")
        elif warn:  # the last line, torn
            say(f"cifar-dist: warning: {path}: line {number} is torn (a write cut short); skipped")
    return rows
