"""`cifar-dist tune`: the same command proposes the same trials, a bad space is refused entry by
entry, a poor trial is pruned at an epoch's end, kill -9 and a re-run end with exactly N trials,
parallel workers share one study, and a 2-process trial reports once."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import BIN, SMOKE, base_env, cli, cli_here, summary

optuna = pytest.importorskip("optuna", reason="Optuna is not installed: pip install 'cifar_dist[tune]'")

# A space over the smoke recipe; its trials take seconds (2 epochs of 32 steps).
SPACE = """
train.lr: {low: 0.02, high: 0.5, log: true}
train.label_smoothing: {low: 0.0, high: 0.2}
data.cutout: {choices: [0, 8]}
"""
SMALL = ["data.synthetic_train=2048", "data.synthetic_test=512", "run.plots=false"]


def _space(tmp_path, text=SPACE):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _trials(out):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    return optuna.load_study(study_name="tune", storage=storage).get_trials()


def _tune(out, space, *extra):
    return ["tune", "--config", SMOKE, "--space", space, "--out", out, *extra, *SMALL]


def test_a_bad_space_is_refused_one_line_per_entry_before_anything_is_written(tmp_path):
    space = _space(
        tmp_path,
        "train.lrr: {low: 0.1, high: 0.2}\n"
        "train.lr: {low: 0.5, high: 0.1}\n"
        "train.weight_decay: {low: 0, high: 0.1, log: true}\n"
        "run.progress: {choices: [true, false]}\n"
        "train.optimizer: {choices: [sgd, lion]}\n"
        "train.momentum: {low: 0.8, high: 0.99}\n",
    )
    res = cli_here(*_tune(tmp_path / "t", space, "--trials", "2"))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"cifar-dist: {space}: train.lrr: unknown key 'train.lrr'",
        f"cifar-dist: {space}: train.lr: an empty range: low 0.5 is not below high 0.1",
        f"cifar-dist: {space}: train.weight_decay: log: true needs low > 0, got 0",
        f"cifar-dist: {space}: run.progress: changes nothing a run trains or measures; "
        "the space takes keys that change the result",
        f"cifar-dist: {space}: train.optimizer: must be one of adam, adamw, sgd, got 'lion'",
    ]
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_the_same_command_proposes_the_same_trials_and_best_prints_their_rerun(tmp_path):
    space = _space(tmp_path)
    runs = []
    for name in ("a", "b"):
        res = cli(*_tune(tmp_path / name, space, "--trials", "3", "--pruner", "none"))
        assert "3 finished, 0 pruned, 0 failed" in res.stdout
        runs.append([(t.number, t.user_attrs["overrides"], t.value) for t in _trials(tmp_path / name)])
    assert runs[0] == runs[1] and len({json.dumps(o) for _, o, _ in runs[0]}) == 3
    for number, _, value in runs[0]:  # each trial is the run a user would make by hand
        s = summary(tmp_path / "a" / f"trial-{number:04d}")
        assert s["test_acc"] == value and s["epochs"] == 2 and s["eval_images"] == 512  # with SMALL's overrides
    best = cli("tune", "--out", tmp_path / "a", "--best", "2")
    top = max(runs[0], key=lambda r: r[2])
    rerun = (
        f"cifar-dist sweep --config {SMOKE} --seeds 3 {' '.join([*SMALL, *top[1]])} --out {tmp_path / 'a' / 'best-1'}"
    )
    assert rerun in best.stdout


def test_a_poor_trial_is_pruned_at_its_first_epoch_with_its_results(tmp_path, monkeypatch):
    """In this process: a study whose one finished trial reached 99% after epoch 1; a trial at a
    learning rate that learns nothing reports 10-20% there and ends after that epoch."""
    import cifar_dist
    from cifar_dist.experiments import tune

    journal = tmp_path / "study.journal"
    study = tune.open_study(str(journal), 0, "median")
    good = optuna.trial.create_trial(params={}, distributions={}, value=0.99, intermediate_values={1: 0.99, 2: 0.995})
    study.add_trial(good)
    study.add_trial(good)  # the median pruner waits for 2 finished trials
    trial = study.ask()
    monkeypatch.setenv(tune.ENV, json.dumps({"storage": str(journal), "trial_id": trial._trial_id, "pruner": "median"}))
    run = tmp_path / "trial"
    result = cifar_dist.train(SMOKE, [*SMALL, "train.lr=1e-6", f"run.callbacks=[{tune.REPORTER}]"], run)
    assert result.code == 0 and result.summary["epochs"] == 1  # of 2
    assert json.loads((run / tune.PRUNED_FILE).read_text())["epoch"] == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "test_acc" in r] == [1]
    assert study.get_trials()[-1].intermediate_values == {1: rows[0]["test_acc"]}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_of_the_tuner_then_the_same_command_ends_with_exactly_n_trials(tmp_path, spawn):
    space, out = _space(tmp_path), tmp_path / "t"
    args = [str(a) for a in _tune(out, space, "--trials", "3", "--pruner", "none")]
    proc = spawn([BIN / "cifar-dist", *args], env=base_env())
    deadline = time.time() + 300
    while not (out / "trial-0001" / "checkpoints").is_dir():  # trial 1 has its first checkpoint
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    res = cli(*args)
    assert "[trial 1] " in res.stdout and "its worker stopped; resuming it" in res.stdout
    trials = _trials(out)
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    log = (out / "logs" / "trial-0001.log").read_text()
    assert "resuming from" in log  # from its checkpoint, not from the start
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-0000", "trial-0001", "trial-0002"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_on_one_study_take_distinct_trials(tmp_path, spawn):
    """Two tuners started at once on one directory (as two Slurm array tasks are), then
    --parallel 2 in one tuner: every trial is run once, by one worker."""
    space, out = _space(tmp_path), tmp_path / "t"
    args = [str(a) for a in _tune(out, space, "--trials", "4", "--pruner", "none")]
    procs = [spawn([BIN / "cifar-dist", *args], env=base_env()) for _ in range(2)]
    outputs = [p.communicate(timeout=500)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    started = [line.split("]")[0] for o in outputs for line in o.splitlines() if line.endswith(": started")]
    assert sorted(started) == [f"[trial {i}" for i in range(4)]
    assert [t.state.name for t in _trials(out)] == ["COMPLETE"] * 4

    out2 = tmp_path / "p"
    res = cli(*_tune(out2, space, "--trials", "4", "--pruner", "none", "--parallel", "2"))
    assert res.stdout.count(": started") == 4 and "4 finished" in res.stdout
    assert [t.user_attrs["overrides"] for t in _trials(out2)] == [t.user_attrs["overrides"] for t in _trials(out)]


@pytest.mark.slow
def test_a_trial_run_by_two_processes_reports_once_per_epoch(tmp_path):
    space, out = _space(tmp_path), tmp_path / "t"
    launch = f"{BIN / 'torchrun'} --nproc_per_node 2"
    res = cli(*_tune(out, space, "--trials", "1", "--launch", launch), env=base_env())
    assert "1 finished" in res.stdout
    (trial,) = _trials(out)
    assert sorted(trial.intermediate_values) == [1, 2]
    log = (out / "logs" / "trial-0000.log").read_text()
    assert "already reported" not in log and summary(out / "trial-0000")["world_size"] == 2


def test_without_optuna_tune_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    res = cli_here(*_tune(tmp_path / "t", _space(tmp_path), "--trials", "1"))
    assert res.returncode == 2
    assert res.stderr == "cifar-dist: cifar-dist tune needs Optuna: pip install 'cifar_dist[tune]'\n"
