"""Experiment trackers (TensorBoard, W&B, MLflow, ...) through Accelerate's tracker layer.

    run:
      trackers: [tensorboard, wandb, mlflow]   # [] for none; package.module:Class for your own
      log_every_steps: 50                      # also the training loss, at the loop's control reads

Rank 0 logs: the run's flattened config once, when the run starts (not again on a resume),
then every epoch row (``metrics.jsonl`` stays the source of truth; non-finite and null
values are left out) and, every ``run.log_every_steps`` steps, the epoch's running training
loss as ``train_loss_running``, all at the global step. What phones home is offline unless
the user says otherwise: W&B runs with ``WANDB_MODE=offline`` unless WANDB_MODE is set,
MLflow writes to ``sqlite:///<run dir>/mlflow.db`` unless MLFLOW_TRACKING_URI is set.

A resumed run continues the same tracker run, and sends a point only where the tracker does
not hold one at that step yet (what it holds is read from the tracker itself, so a kill -9
between a point and the checkpoint neither doubles nor loses it):

    tensorboard   the writer purges every event after the checkpoint's step (``purge_step``),
                  and the resumed run logs those steps again, as it trains them again
    wandb         the same run id (kept in ``trackers.json``) with ``resume="allow"``; offline,
                  each start writes one directory (``wandb sync`` joins them into the run), and
                  the steps the earlier ones hold are not sent again; online, W&B itself
                  ignores a step below the run's
    mlflow        the same run id (kept in ``trackers.json``); the steps its store holds for
                  the rows and the running loss are not sent again
    others        a new tracker run for each start
    and each is sent the checkpoint's rows it lacks (W&B offline keeps up to 15 s of points in
    memory, which a kill -9 loses: the rows come back this way, the running losses do not)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import struct
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

from cifar_dist.config.plugins import import_object, is_spec
from cifar_dist.errors import ConfigError
from cifar_dist.storage.files import no_link, write_json_atomic

# Accelerate's tracker names and the module each needs (and its pip name where it differs).
PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "comet_ml": "comet_ml",
    "swanlab": "swanlab",
    "trackio": "trackio",
}
PIP_NAMES = {"comet_ml": "comet-ml"}
# MLflow exports the store it is given to the environment (for child processes): the ones set
# here for earlier runs of this process are not the user's.
_MLFLOW_URIS_SET: set[str] = set()
LEDGER = "trackers.json"  # the run ids of the trackers that continue a run
LEDGER_KEYS = ("wandb_id", "mlflow_run_id")
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # W&B's and MLflow's ids; W&B's names folders: nothing path-like
ROW_KEY, LOSS_KEY = "epoch", "train_loss_running"  # a key every row has; the running loss


def check_trackers(names: list[str]) -> None:
    """Refuse, before any set-up, a tracker that is unknown or whose package is not installed
    (one line, exit 2); a ``package.module:Class`` must name one of Accelerate's GeneralTracker.
    A tracker named twice would log every point twice (two TensorBoard writers, one folder)."""
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise ConfigError(f"run.trackers: {twice} is named twice; name each tracker once")
    for name in names:
        if is_spec(name):
            _custom_class(name)
            continue
        if name not in PACKAGES:
            raise ConfigError(
                f"run.trackers: unknown tracker {name!r} (one of {', '.join(PACKAGES)}, or package.module:Class)"
            )
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(
                f"run.trackers: {name} is not installed: pip install {PIP_NAMES.get(name, PACKAGES[name])} "
                f"(or leave {name} out of run.trackers)"
            )


def _custom_class(spec: str):
    from accelerate.tracking import GeneralTracker

    cls = import_object(spec, "run.trackers")
    if not (isinstance(cls, type) and issubclass(cls, GeneralTracker)):
        raise ConfigError(f"run.trackers: {spec!r} is not a subclass of accelerate.tracking.GeneralTracker")
    return cls


def loggable(values: dict) -> dict:
    """The values a tracker takes: finite numbers (bools as 0/1), strings; no None, NaN, inf,
    lists or mappings."""
    out: dict = {}
    for k, v in values.items():
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = v
        elif isinstance(v, str):
            out[k] = v
    return out


def config_values(flat: dict) -> dict:
    """A flattened config as hyperparameters: scalars as they are, lists and null as text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flat.items()}


class Trackers:
    """The run's trackers on rank 0 (none elsewhere, or with ``run.trackers: []``), each with
    the last step of each kind of point (rows, loss) it already holds."""

    def __init__(self, trackers: list, held: list[dict]):
        self.trackers, self.held = trackers, held

    @classmethod
    def start(
        cls, names: list[str], run_dir: Path, project: str, config: dict, step: int, history: Sequence[dict] = ()
    ) -> Trackers:
        """Start each tracker in ``run_dir``, where training starts at global step ``step`` with
        the rows ``history`` behind it (a resumed run: its checkpoint's; 0 and none for a new
        one). A run directory with a ``trackers.json`` was started before: its tracker runs
        are continued, and each is sent the rows of ``history`` it does not hold (W&B can lose
        the last seconds of an offline run to a kill -9; a tracker added on a resume starts
        with the run's rows so far). Each tracker run that is new gets the config; a continued
        one has it already."""
        run_dir = Path(run_dir)
        if not names:
            return cls([], [])
        for folder in {"trackers", *names}:  # where they write: never through a link
            if not is_spec(folder):
                no_link(run_dir / folder)
        first = not (run_dir / LEDGER).exists()
        ledger = {} if first else _read_ledger(run_dir / LEDGER)
        made = [_make(name, run_dir, project, ledger, None if first else step) for name in names]
        trackers = [tracker for tracker, _ in made]
        held = [{"rows": -1, "loss": -1} if first else _held(t, run_dir, step, ledger) for t in trackers]
        for tracker in trackers:
            tracker.start()
        values = config_values(config)
        for tracker, continues in made:  # the config once per tracker run: a continued one has it
            if not continues:
                tracker.store_init_configuration(values)
        for tracker in trackers:
            if tracker.name == "mlflow":
                ledger["mlflow_run_id"] = tracker.active_run.info.run_id
        write_json_atomic(run_dir / LEDGER, ledger)
        self = cls(trackers, held)
        for row in history:
            self.log_row(row)
        return self

    def log_row(self, row: dict) -> None:
        """An epoch row, at its global step (its ``step``)."""
        self._log("rows", loggable({k: v for k, v in row.items() if k != "step"}), row["step"])

    def log_loss(self, loss: float, step: int) -> None:
        """The epoch's running training loss at global step ``step`` (a control read)."""
        self._log("loss", loggable({LOSS_KEY: loss}), step)

    def _log(self, kind: str, values: dict, step: int) -> None:
        for tracker, held in zip(self.trackers, self.held):
            if values and step > held[kind]:
                tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers, self.held = [], []


def _held(tracker, run_dir: Path, step: int, ledger: dict) -> dict:
    """The last step of rows and of running losses that ``tracker`` (not started yet) holds from
    earlier starts."""
    if tracker.name == "tensorboard":  # purged after ``step``
        return {"rows": step, "loss": step}
    if tracker.name == "wandb" and os.environ.get("WANDB_MODE") == "offline":
        last = wandb_offline_last_step(run_dir, ledger.get("wandb_id", ""))
        return {"rows": last, "loss": last}
    if tracker.name == "mlflow" and ledger.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        client, run_id = MlflowClient(), ledger["mlflow_run_id"]
        return {
            kind: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            for kind, key in (("rows", ROW_KEY), ("loss", LOSS_KEY))
        }
    return {"rows": -1, "loss": -1}  # a new tracker run, or one that drops an earlier step itself


def wandb_offline_last_step(run_dir: Path, run_id: str) -> int:
    """The last history step of the offline W&B run ``run_id`` in ``run_dir/wandb``, over the
    directories of earlier starts (-1: none). W&B keeps data in its ``.wandb`` files in
    memory for up to 15 s, so a kill -9 can take the newest points with it: these files,
    not what was sent, say what the run holds."""
    last = -1
    for path in sorted(Path(run_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                last = max(last, record.history.step.num)
    return last


def wandb_records(path: Path):
    """The protobuf records of a W&B run file: a 7-byte header, then LevelDB-log chunks in
    32 KiB blocks (each: CRC, length, type; type 1 is a whole record, 2 to 4 its pieces). A
    torn tail (a killed writer) ends the scan."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pieces = Path(path).read_bytes(), 32768, 7, b""
    if data[:4] != b":W&B":
        return
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if pos + 7 + length > len(data):
            return
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            try:
                record.ParseFromString(pieces)
            except Exception:  # a record cut short
                return
            pieces = b""
            yield record


def tracker_places(names: list[str], run_dir: Path) -> str:
    """Where each tracker writes, in words, for the run's opening lines."""
    where = {
        "tensorboard": f"tensorboard ({run_dir}/tensorboard; tensorboard --logdir {run_dir}/tensorboard)",
        "wandb": f"wandb {os.environ.get('WANDB_MODE', 'offline')} ({run_dir}/wandb"
        + (
            f"; wandb sync {run_dir}/wandb/offline-run-*)"
            if os.environ.get("WANDB_MODE", "offline") == "offline"
            else ")"
        ),
        "mlflow": f"mlflow ({os.environ.get('MLFLOW_TRACKING_URI') or f'sqlite:///{run_dir}/mlflow.db'})",
    }
    return ", ".join(where.get(name, name) for name in names)


def _read_ledger(path: Path) -> dict:
    """``trackers.json`` of an earlier start: the tracker run ids it continues. An unreadable
    file or a value that is no run id is warned about and left out: those trackers start new
    runs (metrics.jsonl, the run's record, is untouched)."""
    try:
        ledger = json.loads(path.read_text())
        if not isinstance(ledger, dict):
            raise ValueError(f"expected an object, got {type(ledger).__name__}")
    except (OSError, ValueError) as e:
        warnings.warn(f"{path}: unreadable ({e}); the trackers start new runs", stacklevel=2)
        return {}
    kept = {}
    for key in LEDGER_KEYS:
        value = ledger.get(key)
        if isinstance(value, str) and RUN_ID.fullmatch(value):
            kept[key] = value
        elif value is not None:
            warnings.warn(f"{path}: {key}: {value!r} is not a run id; that tracker starts a new run", stacklevel=2)
    return kept


def _mlflow_has_run(run_id: str) -> bool:
    """Whether the MLflow store set now holds run ``run_id`` (one it lost, or another store)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def _make(name: str, run_dir: Path, project: str, ledger: dict, resumed_at: int | None):
    """One of Accelerate's trackers (not started), set up to write in ``run_dir`` and to continue
    the tracker run of an earlier start, and whether it does (else its run is new)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if is_spec(name):
        cls = _custom_class(name)
        return (cls(project, str(run_dir / "trackers")) if cls.requires_logging_directory else cls(project)), False
    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":  # the run directory's tensorboard/ folder
        purge = {"purge_step": resumed_at + 1} if resumed_at is not None else {}
        continues = resumed_at is not None and any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        return cls("tensorboard", str(run_dir), **purge), continues
    if name == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")  # the run's opening lines say where it writes
        continues = "wandb_id" in ledger
        run_id = ledger.get("wandb_id") or uuid.uuid4().hex[:12]
        ledger["wandb_id"] = run_id
        return cls(
            os.environ.get("WANDB_PROJECT", "cifar_dist"),
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            name=run_dir.name,
            group=project,
        ), continues
    if name == "mlflow":
        import logging

        import mlflow

        for quiet in ("mlflow", "alembic"):  # the store's set-up narrates each table it creates
            logging.getLogger(quiet).setLevel(logging.WARNING)

        given = os.environ.get("MLFLOW_TRACKING_URI")
        if not given or given in _MLFLOW_URIS_SET:  # the user's store, else the run directory's
            uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
            _MLFLOW_URIS_SET.add(uri)
            mlflow.set_tracking_uri(uri)
        if "mlflow_run_id" in ledger and not _mlflow_has_run(ledger["mlflow_run_id"]):
            warnings.warn(
                f"{run_dir / LEDGER}: mlflow_run_id: run {ledger.pop('mlflow_run_id')} is not in "
                f"{mlflow.get_tracking_uri()}; a new MLflow run starts",
                stacklevel=2,
            )
        tracker = cls(
            experiment_name=project,
            logging_dir=str((run_dir / "mlflow").resolve()),
            run_id=ledger.get("mlflow_run_id"),
            run_name=run_dir.name,
        )
        return tracker, "mlflow_run_id" in ledger
    if cls.requires_logging_directory:
        return cls(project, str(run_dir / name)), False
    return cls(project), False
