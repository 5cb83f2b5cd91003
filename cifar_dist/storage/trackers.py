"""Experiment trackers (TensorBoard, W&B, MLflow, ...) through Accelerate, from rank 0: offline by
default; a resume continues each tracker run and never sends a point twice (docs/observability.md)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

from cifar_dist.config.plugins import import_object, is_spec
from cifar_dist.errors import ConfigError
from cifar_dist.storage.files import no_link, write_json_atomic

# Accelerate's tracker names, each also the module it needs (and its pip name, but for PIP_NAMES)
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "clearml", "dvclive", "comet_ml", "swanlab", "trackio")
PIP_NAMES = {"comet_ml": "comet-ml"}
# MLflow exports the store it is given to the environment (for child processes): the ones set
# here for earlier runs of this process are not the user's.
_MLFLOW_URIS_SET: set[str] = set()
LEDGER = "trackers.json"  # the run ids of the trackers that continue a run, and what each was sent
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # W&B's and MLflow's ids; W&B's names folders: nothing path-like
NOTHING = {"rows": -1, "loss": -1}  # the last step of each kind of point a tracker holds


def check_trackers(names: list[str]) -> None:
    """Refuse, before any set-up, a tracker that is unknown, not installed or named twice (it would
    log every point twice); a ``package.module:Class`` must be one of Accelerate's GeneralTracker."""
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise ConfigError(f"run.trackers: {twice} is named twice; name each tracker once")
    for name in names:
        if is_spec(name):
            _custom_class(name)
        elif name not in TRACKERS:
            raise ConfigError(
                f"run.trackers: unknown tracker {name!r} (one of {', '.join(TRACKERS)}, or package.module:Class)"
            )
        elif importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"run.trackers: {name} is not installed: pip install {PIP_NAMES.get(name, name)} "
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
        elif isinstance(v, str) or (isinstance(v, (int, float)) and math.isfinite(v)):
            out[k] = v
    return out


class Trackers:
    """The run's trackers (rank 0; none elsewhere), each with the last step of rows and of losses it holds."""

    def __init__(self, trackers: list, held: list[dict], ledger: dict | None = None, path: Path | None = None):
        self.trackers, self.held, self.ledger, self.path = trackers, held, ledger or {}, path

    @classmethod
    def start(
        cls, names: list[str], run_dir: Path, project: str, config: dict, step: int, history: Sequence[dict] = ()
    ) -> Trackers:
        """Start each tracker at global step ``step``, after the rows ``history``: the tracker runs of a
        ``trackers.json`` continue past what they were sent; a new one gets the config and ``history``."""
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
        held = [_sent(ledger, tracker.name, step) if continues else dict(NOTHING) for tracker, continues in made]
        # the flattened config as hyperparameters: scalars as they are, lists and null as text
        values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config.items()}
        for tracker, continues in made:
            tracker.start()
            if not continues:  # the config once per tracker run: a continued one has it
                tracker.store_init_configuration(values)
            if tracker.name == "mlflow":
                ledger["mlflow_run_id"] = tracker.active_run.info.run_id
        self = cls(trackers, held, ledger, run_dir / LEDGER)
        self._write_ledger()
        for row in history:
            self.log_row(row)
        return self

    def log_row(self, row: dict) -> None:
        """An epoch row, at its global step (its ``step``)."""
        self._log("rows", loggable({k: v for k, v in row.items() if k != "step"}), row["step"])

    def log_loss(self, loss: float, step: int) -> None:
        """The epoch's running training loss at global step ``step`` (a control read)."""
        self._log("loss", loggable({"train_loss_running": loss}), step)

    def _log(self, kind: str, values: dict, step: int) -> None:
        due = [(tracker, held) for tracker, held in zip(self.trackers, self.held) if values and step > held[kind]]
        for _, held in due:
            held[kind] = step
        if due:  # marked before it goes out: a kill -9 in between loses the point, never doubles it
            self._write_ledger()
        for tracker, _ in due:
            tracker.log(values, step=step)

    def _write_ledger(self, closed: bool = False) -> None:
        if self.path is not None:
            sent = {tracker.name: held for tracker, held in zip(self.trackers, self.held)}
            write_json_atomic(self.path, {**self.ledger, "sent": sent, "closed": closed})

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        if self.trackers:
            self._write_ledger(closed=True)
        self.trackers, self.held = [], []


def _sent(ledger: dict, name: str, step: int) -> dict:
    """The last step of rows and of running losses that tracker ``name`` holds from earlier starts."""
    if name == "tensorboard":  # purged after ``step``
        return {"rows": step, "loss": step}
    sent = ledger.get("sent", {}).get(name)
    sent = {kind: sent[kind] if isinstance(sent, dict) and type(sent.get(kind)) is int else -1 for kind in NOTHING}
    if name == "wandb" and not ledger.get("closed"):  # W&B writes a step when the next one comes: a kill lost it
        last = max(sent.values())
        sent = {kind: min(at, last - 1) for kind, at in sent.items()}
    return sent


def tracker_places(names: list[str], run_dir: Path) -> str:
    """Where each tracker writes, in words, for the run's opening lines."""
    mode = os.environ.get("WANDB_MODE", "offline")
    sync = f"; wandb sync {run_dir}/wandb/offline-run-*" if mode == "offline" else ""
    where = {
        "tensorboard": f"tensorboard ({run_dir}/tensorboard; tensorboard --logdir {run_dir}/tensorboard)",
        "wandb": f"wandb {mode} ({run_dir}/wandb{sync})",
        "mlflow": f"mlflow ({os.environ.get('MLFLOW_TRACKING_URI') or f'sqlite:///{run_dir}/mlflow.db'})",
    }
    return ", ".join(where.get(name, name) for name in names)


def _read_ledger(path: Path) -> dict:
    """``trackers.json`` of an earlier start: the tracker run ids it continues and the steps each was
    sent. An unreadable file or a value that is no run id is warned about; those trackers start anew."""
    try:
        ledger = json.loads(path.read_text())
        if not isinstance(ledger, dict):
            raise ValueError(f"expected an object, got {type(ledger).__name__}")
    except (OSError, ValueError) as e:
        warnings.warn(f"{path}: unreadable ({e}); the trackers start new runs", stacklevel=2)
        return {}
    kept = {key: ledger[key] for key in ("sent", "closed") if isinstance(ledger.get(key), (dict, bool))}
    for key in ("wandb_id", "mlflow_run_id"):
        value = ledger.get(key)
        if isinstance(value, str) and RUN_ID.fullmatch(value):
            kept[key] = value
        elif value is not None:
            warnings.warn(f"{path}: {key}: {value!r} is not a run id; that tracker starts a new run", stacklevel=2)
    return kept


def _wandb_flush() -> dict:
    """W&B writes its run file every 15 s by default, so a kill -9 would lose what it was sent
    in that time (which ``trackers.json`` says it holds): every 0.05 s instead."""
    import wandb

    key = "x_transaction_log_flush_interval"  # older W&B versions lack it (and keep their own)
    return {key: 0.05} if key in wandb.Settings.model_fields else {}


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

    custom = is_spec(name)
    cls = _custom_class(name) if custom else LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":  # the run directory's tensorboard/ folder
        purge = {"purge_step": resumed_at + 1} if resumed_at is not None else {}
        continues = resumed_at is not None and any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        return cls("tensorboard", str(run_dir), **purge), continues
    if name == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")  # the run's opening lines say where it writes
        continues = "wandb_id" in ledger
        run_id = ledger.setdefault("wandb_id", uuid.uuid4().hex[:12])
        return cls(
            os.environ.get("WANDB_PROJECT", "cifar_dist"),
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            name=run_dir.name,
            group=project,
            settings=_wandb_flush(),
        ), continues
    if name == "mlflow":
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
    folder = run_dir / ("trackers" if custom else name)
    return (cls(project, str(folder)) if cls.requires_logging_directory else cls(project)), False
