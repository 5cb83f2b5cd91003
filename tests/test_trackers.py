"""Experiment trackers through Accelerate, with the real packages and no network: TensorBoard
read back with its own event reader, W&B offline (its run files read record by record), MLflow
in a local SQLite store. What they hold equals metrics.jsonl, once per point, also after a
kill -9 and --resume."""

from __future__ import annotations

import json
import math
import signal
import struct
from pathlib import Path

import pytest
from accelerate.tracking import GeneralTracker

from cifar_dist.errors import ConfigError
from cifar_dist.storage.trackers import Trackers, check_trackers, loggable

from conftest import FAULT_ARG, base_env, cli, fault_env
from helpers import SMOKE


@pytest.fixture(autouse=True)
def accelerate_state():
    """Accelerate's trackers log through its logger, which needs its process state (a run has it)."""
    from accelerate import PartialState

    PartialState(cpu=True)


ROW_VALUES = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")  # trained: the same when retrained
MEASURED = ("epoch_time_s", "images_per_s", "peak_memory_gb")  # measured: a retrained epoch's differ


def tensorboard_points(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()  # purges what a resumed writer's purge_step hides, as TensorBoard shows it
    return [(e.step, e.value) for e in events.Scalars(key)] if key in events.Tags()["scalars"] else []


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


def wandb_points(run_dir: Path, key: str) -> tuple[set, list[tuple[int, float]]]:
    """(the run ids of every offline directory, the (step, value) points of ``key`` in them)."""
    ids, points = set(), []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                if key in items:
                    points.append((items["_step"], items[key]))
    return ids, points


def mlflow_points(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    ledger = json.loads((run_dir / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    return sorted((m.step, m.value) for m in client.get_metric_history(ledger["mlflow_run_id"], key))


def mlflow_params(run_dir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    ledger = json.loads((run_dir / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    return client.get_run(ledger["mlflow_run_id"]).data.params


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_trackers_hold_the_rows(run_dir: Path) -> None:
    rows = _rows(run_dir)
    for key in ROW_VALUES:
        expected = [(r["step"], r[key]) for r in rows]
        tb = tensorboard_points(run_dir, key)
        assert [s for s, _ in tb] == [s for s, _ in expected], (key, tb)
        assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(tb, expected)), key  # float32
        ids, wb = wandb_points(run_dir, key)
        assert len(ids) == 1 and wb == expected, (key, wb)
        assert mlflow_points(run_dir, key) == expected, key
    steps = [r["step"] for r in rows]
    for key in MEASURED:  # once per epoch; an epoch trained again keeps the values a tracker has
        assert [s for s, _ in tensorboard_points(run_dir, key)] == steps, key
        assert [s for s, _ in wandb_points(run_dir, key)[1]] == steps, key
        assert [s for s, _ in mlflow_points(run_dir, key)] == steps, key


def test_a_tracker_not_installed_or_unknown_is_refused_in_one_line(monkeypatch):
    import importlib.util

    check_trackers(["tensorboard", "wandb", "mlflow", "test_trackers:ListTracker"])  # installed here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^run.trackers: wandb is not installed: pip install wandb "):
        check_trackers(["tensorboard", "wandb"])
    with pytest.raises(ConfigError, match=r"^run.trackers: unknown tracker 'tensorbored' \(one of tensorboard, "):
        check_trackers(["tensorbored"])
    with pytest.raises(ConfigError, match="is not a subclass of accelerate.tracking.GeneralTracker"):
        check_trackers(["cifar_dist.errors:ConfigError"])
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        check_trackers(["no_such_module:Tracker"])
    with pytest.raises(ConfigError, match=r"^run.trackers: tensorboard is named twice; name each tracker once$"):
        check_trackers(["tensorboard", "mlflow", "tensorboard"])


class ListTracker(GeneralTracker):
    """A user's own tracker (``run.trackers: [package.module:Class]``): keeps what it is given."""

    name, requires_logging_directory, main_process_only = "list", False, True
    logged: list = []

    def __init__(self, run_name):
        super().__init__()

    @property
    def tracker(self):
        return self.logged

    def store_init_configuration(self, values):
        self.logged.append(("config", values))

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, values))


def test_a_users_general_tracker_gets_the_config_once_and_every_row(tmp_path):
    ListTracker.logged = []
    trackers = Trackers.start(["test_trackers:ListTracker"], tmp_path, "t", {"model.widths": [8, 16]}, step=0)
    trackers.log_row({"epoch": 1, "step": 8, "train_loss": 2.0, "mfu": None})
    trackers.close()
    assert ListTracker.logged == [("config", {"model.widths": "[8, 16]"}), (8, {"epoch": 1, "train_loss": 2.0})]


def test_only_finite_numbers_and_text_go_to_a_tracker():
    row = {"a": 1.5, "b": float("nan"), "c": None, "d": float("inf"), "e": True, "f": "x", "g": [1]}
    assert loggable(row) == {"a": 1.5, "e": 1, "f": "x"}


def test_tensorboard_holds_each_row_at_its_global_step_and_a_restart_purges_what_followed(tmp_path):
    """The writer of a resumed run drops every event after the checkpoint's step: the steps
    the resumed run trains again are logged once, by it."""
    rows = [{"epoch": e, "step": 8 * e, "train_loss": 3.0 - e, "mfu": None} for e in (1, 2, 3)]
    first = Trackers.start(["tensorboard"], tmp_path, "t", {"train.lr": 0.1, "model.widths": [8]}, step=0)
    for row in rows:
        first.log_row(row)
    first.close()
    assert (tmp_path / "trackers.json").is_file()
    again = Trackers.start(["tensorboard"], tmp_path, "t", {}, step=8)  # resumed from the step-8 checkpoint
    for row in rows[1:]:
        again.log_row({**row, "train_loss": row["train_loss"] + 0.5})  # retrained: the new values win
    again.close()
    assert tensorboard_points(tmp_path, "train_loss") == [(8, 2.0), (16, 1.5), (24, 0.5)]
    assert tensorboard_points(tmp_path, "mfu") == []


def test_wandb_and_mlflow_skip_what_the_ledger_says_they_received(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    row = {e: {"epoch": e, "step": 8 * e, "train_loss": 3.0 - e} for e in (1, 2, 3, 4)}
    first = Trackers.start(["wandb", "mlflow"], tmp_path, "t", {"train.lr": 0.1}, step=0)
    first.log_row(row[1]), first.log_loss(2.5, 10), first.log_row(row[2]), first.log_loss(2.0, 20)
    first.log_row(row[3])
    first.close()  # (then killed in epoch 4; the newest checkpoint is of step 8)
    again = Trackers.start(["wandb", "mlflow"], tmp_path, "t", {"train.lr": 0.1}, step=8)
    again.log_loss(2.5, 10), again.log_row(row[2]), again.log_loss(2.0, 20), again.log_row(row[3])  # not again
    again.log_loss(1.5, 30), again.log_row({**row[4], "train_loss": -1.0})
    again.close()
    expected = [(8, 2.0), (16, 1.0), (24, 0.0), (32, -1.0)]
    ids, points = wandb_points(tmp_path, "train_loss")
    assert len(ids) == 1 and points == expected
    assert mlflow_points(tmp_path, "train_loss") == expected
    assert mlflow_points(tmp_path, "train_loss_running") == [(10, 2.5), (20, 2.0), (30, 1.5)]
    assert wandb_points(tmp_path, "train_loss_running")[1] == [(10, 2.5), (20, 2.0), (30, 1.5)]


@pytest.mark.parametrize(
    "damage, warning",
    [
        ("{bad", r"trackers.json: unreadable \(Expecting property name.*\); the trackers start new runs"),
        ("[1]", r"trackers.json: unreadable \(expected an object, got list\); the trackers start new runs"),
        ('{"mlflow_run_id": 5}', r"trackers.json: mlflow_run_id: 5 is not a run id; that tracker starts a new run"),
        ('{"mlflow_run_id": "abc"}', r"trackers.json: mlflow_run_id: run abc is not in sqlite:///.*; a new MLflow"),
    ],
    ids=["not_json", "not_an_object", "not_an_id", "not_in_the_store"],
)
def test_a_damaged_ledger_is_warned_about_and_the_tracker_starts_a_new_run(tmp_path, monkeypatch, damage, warning):
    """A resume whose trackers.json cannot be trusted says so and starts a new MLflow run with
    the checkpoint's rows; the earlier run keeps its points, and training goes on."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = [{"epoch": e, "step": 8 * e, "train_loss": 3.0 - e} for e in (1, 2)]
    first = Trackers.start(["mlflow"], tmp_path, "t", {"train.lr": 0.1}, step=0)
    for row in rows:
        first.log_row(row)
    first.close()
    before = json.loads((tmp_path / "trackers.json").read_text())["mlflow_run_id"]
    (tmp_path / "trackers.json").write_text(damage)
    with pytest.warns(UserWarning, match=warning):
        again = Trackers.start(["mlflow"], tmp_path, "t", {"train.lr": 0.1}, step=16, history=rows)
    again.log_row({"epoch": 3, "step": 24, "train_loss": 0.0})
    again.close()
    assert json.loads((tmp_path / "trackers.json").read_text())["mlflow_run_id"] != before
    assert mlflow_points(tmp_path, "train_loss") == [(8, 2.0), (16, 1.0), (24, 0.0)]
    assert mlflow_params(tmp_path) == {"train.lr": "0.1"}  # a new run: the config again
    (tmp_path / "trackers.json").write_text(json.dumps({"mlflow_run_id": before}))
    assert mlflow_points(tmp_path, "train_loss") == [(8, 2.0), (16, 1.0)]  # the earlier run, as it was


def test_the_config_goes_once_to_each_tracker_run(tmp_path, monkeypatch):
    """A continued run has the config already (MLflow refuses a parameter logged again with
    another value: here a result-free key a resume changed); a tracker added on a resume
    starts a new run, which gets it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ListTracker.logged = []
    first = Trackers.start(["mlflow"], tmp_path, "t", {"run.progress": True}, step=0)
    first.log_row({"epoch": 1, "step": 8, "train_loss": 2.0})
    first.close()
    again = Trackers.start(["mlflow", "test_trackers:ListTracker"], tmp_path, "t", {"run.progress": False}, step=8)
    again.close()
    assert mlflow_params(tmp_path) == {"run.progress": "True"}
    assert ListTracker.logged == [("config", {"run.progress": False})]


TRACKED = [
    "run.trackers=[tensorboard, wandb, mlflow]",
    "run.log_every_steps=10",
    "data.synthetic_train=512",
    "data.synthetic_test=256",
    "train.epochs=4",
    "checkpoint.every_epochs=2",
    "run.progress=false",
    "run.plots=false",
]


@pytest.mark.slow
def test_kill_9_and_resume_leave_one_point_per_epoch_in_every_tracker(tmp_path, monkeypatch):
    """4 epochs of 8 steps, a checkpoint every 2 epochs: killed in epoch 4, after epoch 3's row
    went out, the run resumes from step 16 and trains epoch 3 again. Every tracker then holds
    each epoch once, equal to metrics.jsonl, and the running loss once per 10 steps."""
    # Each command from scratch, as a user runs them: W&B hands the service it starts to child
    # processes (WANDB_SERVICE) and MLflow its store (MLFLOW_TRACKING_URI), and the in-process tests
    # above started both in this process (a shared W&B service would still hold the killed run).
    monkeypatch.setenv("CIFAR_DIST_TEST_COLD", "1")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, env = tmp_path / "run", fault_env("kill@28", WANDB_MODE="offline")
    res = cli("train", "--config", SMOKE, "--out", out, *TRACKED, FAULT_ARG, env=env, check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert [(s, round(v, 9)) for s, v in tensorboard_points(out, "train_loss")][-1][0] == 24  # epoch 3 went out
    res = cli("train", "--out", out, "--resume", "run.callbacks=[]", env=base_env(WANDB_MODE="offline"))
    assert "step 16)" in res.stdout, res.stdout
    assert [r["epoch"] for r in _rows(out)] == [1, 2, 3, 4]
    assert_trackers_hold_the_rows(out)
    assert [s for s, _ in tensorboard_points(out, "train_loss_running")] == [10, 20, 30]
    assert [s for s, _ in mlflow_points(out, "train_loss_running")] == [10, 20, 30]
    # W&B offline holds its newest points in memory for up to 15 s: the kill may take the running
    # losses of the first start with it (the rows were sent again from the checkpoint), never doubled
    wandb_losses = [s for s, _ in wandb_points(out, "train_loss_running")[1]]
    assert wandb_losses == sorted(set(wandb_losses)) and set(wandb_losses) <= {10, 20, 30} and 30 in wandb_losses


@pytest.mark.slow
def test_a_named_tracker_that_is_not_installed_exits_2_in_one_line(tmp_path):
    res = cli("train", "--config", SMOKE, "--out", tmp_path / "run", "run.trackers=[aim]", check=False)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "cifar-dist: run.trackers: aim is not installed: pip install aim (or leave aim out of run.trackers)"
    )
    assert not (tmp_path / "run").exists()


def test_each_run_of_a_process_keeps_its_own_mlflow_store(tmp_path, monkeypatch):
    """MLflow exports the store it is set to (MLFLOW_TRACKING_URI); a second run in the same
    process still writes to its own run directory, not to the first run's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("a", "b"):
        trackers = Trackers.start(["mlflow"], tmp_path / name, "t", {}, step=0)
        trackers.log_row({"epoch": 1, "step": 8, "train_loss": 1.0 if name == "a" else 2.0})
        trackers.close()
    assert mlflow_points(tmp_path / "a", "train_loss") == [(8, 1.0)]
    assert mlflow_points(tmp_path / "b", "train_loss") == [(8, 2.0)]
