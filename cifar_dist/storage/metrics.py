"""``metrics.jsonl``, the source of truth of a run's epoch rows (rank 0 writes), and its one reader."""

from __future__ import annotations

import json
from pathlib import Path

from cifar_dist.errors import UserError, say
from cifar_dist.storage.files import write_text_atomic
from cifar_dist.storage.trackers import Trackers


class MetricsLog:
    """One flat dict per epoch into ``metrics.jsonl``, then to the run's trackers. The small file is
    rewritten whole (temporary file, rename) at every row: a full disk never leaves it torn."""

    def __init__(self, run_dir: Path, history: list[dict] | None = None, trackers=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.history = list(history or [])
        self.trackers = trackers if trackers is not None else Trackers([], [])
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

    def log_loss(self, loss: float, step: int) -> None:
        """A running training loss between rows: to the trackers only (the rows hold the epoch's)."""
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
