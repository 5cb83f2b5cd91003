"""`cifar-dist tune`: a search over config keys with Optuna, every trial an ordinary run directory;
resumable, pruned by the per-epoch test accuracy, shared by workers and Slurm array tasks
(docs/tune.md)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_dist.config.loading import load_config, read_yaml
from cifar_dist.config.overrides import override_text
from cifar_dist.config.schema import result_free_keys
from cifar_dist.errors import ConfigError, UserError
from cifar_dist.experiments.sweep import Signals, finished_run, slots, stop_with_parent
from cifar_dist.storage.files import own_folder, utf8_path, write_json_atomic
from cifar_dist.storage.rundir import lock_holder

ENV = "CIFAR_DIST_TUNE"  # what a trial's run needs to report to its study: storage, study, trial
REPORTER = "cifar_dist.experiments.tune:TrialReporter"
PRUNED_FILE = "pruned.json"
STUDY = "tune"


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("cifar-dist tune needs Optuna: pip install 'cifar_dist[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# --- the search space ------------------------------------------------------------------------------


@dataclass
class Param:
    """One key of the space: a float or int range (``log``: sampled on a log scale), or choices
    (kept as their override text, so lists and strings are choices too)."""

    key: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: list[str] | None = None
    integer: bool = False

    def suggest(self, trial) -> str:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if self.integer:
            return str(trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log))
        return f"{trial.suggest_float(self.key, self.low, self.high, log=self.log):.4g}"  # what a person would type


ENTRY_FIELDS = {"low", "high", "log", "choices"}


def read_space(path: str, config: str | None, overrides: list[str]) -> list[Param]:
    """The space file, each entry checked as an override of ``config`` would be; every bad entry
    is one line of the error."""
    where = str(path)
    tree = read_yaml(path)
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{where}: a search space maps config keys to ranges or choices (docs/tune.md)")
    free, params, bad = result_free_keys(), [], []
    for key, entry in tree.items():
        try:
            params.append(_param(str(key), entry, (config, overrides), free))
        except ConfigError as e:
            bad.append(f"{where}: {key}: {e}")
    if bad:
        raise ConfigError("\ncifar-dist: ".join(bad))
    return params


def _param(key: str, entry, config: tuple, free) -> Param:
    if key == "run.seed":
        raise ConfigError("seeds are not searched; re-run the best trials with seeds (cifar-dist tune --best)")
    if key in free:
        raise ConfigError("changes nothing a run trains or measures; the space takes keys that change the result")
    if not isinstance(entry, dict) or not entry or set(entry) - ENTRY_FIELDS:
        raise ConfigError("expected {low: A, high: B[, log: true]} or {choices: [A, B, ...]}")
    if "choices" in entry:
        choices = entry["choices"]
        if set(entry) != {"choices"} or not isinstance(choices, list) or len(choices) < 2:
            raise ConfigError("choices: a list of at least two values, and nothing else")
        texts = [override_text(c) for c in choices]
        if len(set(texts)) != len(texts):
            raise ConfigError("choices: a value is listed twice")
        for text in texts:
            _check_value(key, text, config)
        return Param(key, choices=texts)
    low: Any = entry.get("low")
    high: Any = entry.get("high")
    log = entry.get("log", False)
    if not (_is_number(low) and _is_number(high) and isinstance(log, bool)):
        raise ConfigError("low and high: numbers; log: true or false")
    if not low < high:
        raise ConfigError(f"an empty range: low {low} is not below high {high}")
    if log and low <= 0:
        raise ConfigError(f"log: true needs low > 0, got {low}")
    kind = type(_value(_check_value(key, str(low), config), key))
    if kind not in (int, float):
        raise ConfigError("a range needs a number key; give choices instead")
    integer = kind is int
    if integer and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"an integer key: low and high must be whole numbers, got {low} and {high}")
    _check_value(key, str(high), config)
    return Param(key, float(low), float(high), log, integer=integer)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_value(key: str, text: str, config: tuple):
    """The config with ``key=text``, or the error the command line would give, without its prefix."""
    try:
        return load_config(config[0], [*config[1], f"{key}={text}"])
    except ConfigError as e:
        message = str(e).removeprefix("command line: ")
        raise ConfigError(message.removeprefix(f"{key}: ")) from None


# --- the study --------------------------------------------------------------------------------------


def open_study(storage: str, seed: int, pruner: str, create: bool = True):
    optuna = _optuna()
    if "://" in storage:
        backend = optuna.storages.RDBStorage(storage)
    else:
        from optuna.storages.journal import JournalFileBackend

        backend = optuna.storages.JournalStorage(JournalFileBackend(storage))
    pruners = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }
    study = optuna.create_study(
        storage=backend,
        study_name=STUDY,
        direction="maximize",
        sampler=_sampler(seed, 0),
        pruner=pruners[pruner](),
        load_if_exists=create,
    )
    return study


def _sampler(seed: int, number: int):
    """TPE seeded by the run's seed and the trial's number: the same command proposes the same
    trials, also after a restart (a sampler that kept one stream would not)."""
    return _optuna().samplers.TPESampler(seed=(seed * 1_000_003 + number) % 2**32)


def _states():
    return _optuna().trial.TrialState


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True):
    """An exclusive flock on ``path`` (yields False when ``blocking`` is off and another holds it).
    A lock dies with its process: a killed worker frees its trials."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


# --- a trial inside its run -------------------------------------------------------------------------


class TrialReporter:
    """The run's side of a trial: after each epoch rank 0 reports the test accuracy to the study
    and asks the pruner; every rank gets the answer (one broadcast per epoch, after the epoch's
    evaluation, which already waits for the device), and a pruned trial ends there, with its
    results and a ``pruned.json``. Without the tuner's environment it does nothing."""

    def __init__(self):
        self.where = json.loads(os.environ[ENV]) if os.environ.get(ENV) else None
        self.run = None

    def on_train_start(self, run) -> None:
        self.run = run

    def on_epoch_end(self, row: dict) -> None:
        if self.where is None or row.get("test_acc") is None or self.run is None:
            return
        from cifar_dist.distributed.collectives import share_from_main

        pruned = share_from_main(lambda: self._report(row["test_acc"], row["epoch"]))
        if pruned:
            from cifar_dist.trainer.stopping import StopReason

            self.run.request_stop(StopReason.REQUESTED)
            if self.run.rank == 0 and self.run.run_dir is not None:
                write_json_atomic(self.run.run_dir / PRUNED_FILE, {"epoch": row["epoch"], "test_acc": row["test_acc"]})

    def _report(self, acc: float, epoch: int) -> bool:
        optuna = _optuna()
        study = open_study(self.where["storage"], 0, self.where["pruner"])
        trial = optuna.trial.Trial(study, self.where["trial_id"])
        trial.report(acc, epoch)
        return trial.should_prune()


# --- the tuner ---------------------------------------------------------------------------------------


class Tuner:
    """One tuning directory: the study (journal file or database), trial-NNNN run directories,
    logs/, and the locks that keep two workers off one trial."""

    def __init__(self, args, params: list[Param]):
        self.args, self.params = args, params
        self.path = Path(args.out)
        self.config = str(Path(args.config).resolve()) if args.config else None
        self.seed = load_config(args.config, args.overrides).run.seed
        self.storage = args.storage or str(self.path / "study.journal")
        self.stopping = threading.Event()
        self.print_lock = threading.Lock()

    def say(self, line: str) -> None:
        with self.print_lock:
            print(line, flush=True)

    def run_dir(self, number: int) -> Path:
        return self.path / f"trial-{number:04d}"

    def open(self):
        utf8_path(self.path.absolute())
        try:
            own_folder(self.path)
            own_folder(self.path / "claims")
            own_folder(self.path / "logs")
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the tuning directory ({e})") from None
        spec = {
            "config": self.config, "overrides": self.args.overrides, "space": [vars(p) for p in self.params],
            "pruner": self.args.pruner,
        }  # fmt: skip
        spec_file = self.path / "tune.json"
        if spec_file.is_file():
            if json.loads(spec_file.read_text()) != spec:
                raise UserError(f"{spec_file}: holds another search (config, space or pruner); choose another --out")
        else:
            write_json_atomic(spec_file, spec)
        return open_study(self.storage, self.seed, self.args.pruner)

    # a worker

    def work(self, slot: dict, user_threads: bool) -> None:
        study = self.open_study_again()
        while not self.stopping.is_set():
            picked = self._next_trial(study)
            if picked is None:
                return
            number, trial_id, overrides, resumed, claim = picked
            with claim:
                self._run_trial(study, number, trial_id, overrides, resumed, slot, user_threads)

    def open_study_again(self):
        return open_study(self.storage, self.seed, self.args.pruner)

    def _next_trial(self, study):
        """Under the tuning directory's lock: a trial whose worker died (resumed), else a new one
        while fewer than --trials have ended or are being run; None when there is none to run."""
        with _locked(self.path / ".study.lock"):
            trials = study.get_trials(deepcopy=False)
            states = _states()
            for t in trials:
                if t.state == states.RUNNING:
                    claim = self._claim(t.number)
                    if claim is not None:
                        return t.number, t._trial_id, t.user_attrs["overrides"], True, claim
            active = sum(t.state in (states.COMPLETE, states.PRUNED, states.FAIL, states.RUNNING) for t in trials)
            if active >= self.args.trials:
                return None
            study.sampler = _sampler(self.seed, len(trials))
            trial = study.ask()
            overrides = [f"{p.key}={p.suggest(trial)}" for p in self.params]
            trial.set_user_attr("overrides", overrides)
            claim = self._claim(trial.number)
            assert claim is not None  # a new trial: nobody else knows it yet
            return trial.number, trial._trial_id, overrides, False, claim

    def _claim(self, number: int):
        """The claim on trial ``number`` (a held lock, released when its worker ends), or None
        while a live worker holds it."""
        stack = contextlib.ExitStack()
        if stack.enter_context(_locked(self.path / "claims" / f"trial-{number:04d}.lock", blocking=False)):
            return stack
        stack.close()
        return None

    def _command(self, number: int, trial_id: int, overrides: list[str], threads: list[str]) -> list[str]:
        launch = shlex.split(self.args.launch) if self.args.launch else [sys.executable]
        config = ["--config", self.config] if self.config else []
        callbacks = [*load_config(self.config, self.args.overrides).run.callbacks, REPORTER]
        return [
            *launch, "-m", "cifar_dist.train", *config, "--out", str(self.run_dir(number)), "--resume",
            *self.args.overrides, *overrides, "run.progress=false", f"run.callbacks={override_text(callbacks)}",
            *threads,
        ]  # fmt: skip

    def _run_trial(self, study, number, trial_id, overrides, resumed, slot, user_threads) -> None:
        run_dir, states = self.run_dir(number), _states()
        shown = " ".join(overrides)
        if resumed:
            self.say(f"[trial {number}] {shown}: its worker stopped; resuming it from {run_dir}")
        else:
            self.say(f"[trial {number}] {shown}: started")
        holder_wait = time.time() + 30 * 60
        while lock_holder(run_dir) is not None and time.time() < holder_wait and not self.stopping.is_set():
            time.sleep(0.5)  # the run of a killed worker is still writing its checkpoint
        threads = [f"run.threads={slot['threads']}"] if "threads" in slot and not user_threads else []
        env = dict(os.environ, CIFAR_DIST_REQUEUE="0", **{k: v for k, v in slot.items() if k != "threads"})
        env[ENV] = json.dumps({"storage": self.storage, "trial_id": trial_id, "pruner": self.args.pruner})
        started = time.time()
        with open(self.path / "logs" / f"trial-{number:04d}.log", "a") as log:
            proc = subprocess.Popen(
                self._command(number, trial_id, overrides, threads), stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=stop_with_parent(os.getpid()),
            )  # fmt: skip
            while proc.poll() is None:
                if self.stopping.is_set():
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
                    break
                time.sleep(0.2)
        code, took = proc.returncode, time.time() - started
        acc = finished_run(run_dir)
        if (run_dir / PRUNED_FILE).is_file() and acc is not None:
            study.tell(number, state=states.PRUNED)
            epoch = json.loads((run_dir / PRUNED_FILE).read_text())["epoch"]
            self.say(f"[trial {number}] pruned after epoch {epoch}: test accuracy {100 * acc:.2f}% ({took:.0f} s)")
        elif code == 0 and acc is not None:
            study.tell(number, acc)
            self.say(f"[trial {number}] done: test accuracy {100 * acc:.2f}% ({took:.0f} s)")
        elif self.stopping.is_set() or code == 0:
            self.say(f"[trial {number}] stopped with its checkpoint; the same command resumes it")
        else:
            study.tell(number, state=states.FAIL)
            self.say(
                f"[trial {number}] FAILED (exit {code}); its log: {self.path / 'logs' / f'trial-{number:04d}.log'}"
            )


def show_best(tuner: Tuner, study, k: int) -> None:
    """The ``k`` best finished trials, and the commands that re-run each with seeds."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == _states().COMPLETE]
    pruned = sum(t.state == _states().PRUNED for t in study.get_trials(deepcopy=False))
    if not done:
        raise UserError(f"{tuner.path}: no finished trial yet ({pruned} pruned)")
    best = sorted(done, key=lambda t: (-t.value, t.number))[:k]
    print(f"{tuner.path}: {len(done)} finished and {pruned} pruned trials; the best {len(best)}:")
    print("| rank | trial | test acc | settings |\n|---|---|---|---|")
    for i, t in enumerate(best, 1):
        print(f"| {i} | {t.number} | {100 * t.value:.2f}% | {' '.join(t.user_attrs['overrides'])} |")
    spec = json.loads((tuner.path / "tune.json").read_text())  # the search's config and fixed overrides
    config = f" --config {shlex.quote(spec['config'])}" if spec["config"] else ""
    print("\nA searched setting is one seed's result; re-run each with seeds, then compare them:")
    for i, t in enumerate(best, 1):
        settings = " ".join(shlex.quote(o) for o in [*spec["overrides"], *t.user_attrs["overrides"]])
        print(f"  cifar-dist sweep{config} --seeds 3 {settings} --out {tuner.path / f'best-{i}'}")
    print("  cifar-dist compare " + " ".join(str(tuner.path / f"best-{i}") for i in range(1, len(best) + 1)))


def add_tune_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="YAML recipe every trial starts from")
    ap.add_argument(
        "--space", help="the search space: a YAML file of key: {low, high[, log]} or {choices} (docs/tune.md)"
    )
    ap.add_argument("--trials", type=int, default=20, help="trials to end, pruned ones included (default 20)")
    ap.add_argument("--out", required=True, help="the tuning directory: the study and one run directory per trial")
    ap.add_argument(
        "--parallel", type=int, default=1, metavar="K", help="workers at once: a GPU each, or a share of the CPU"
    )
    ap.add_argument(
        "--storage",
        help="an Optuna storage URL (postgresql://..., sqlite:///...) or journal file (default OUT/study.journal)",
    )
    ap.add_argument(
        "--pruner", choices=["median", "halving", "none"], default="median", help="stops poor trials at an epoch's end"
    )
    ap.add_argument("--launch", help="the launcher of each trial, e.g. 'torchrun --nproc_per_node 2' (default: python)")
    ap.add_argument(
        "--best", type=int, metavar="K", help="print the K best trials and the commands that re-run them with seeds"
    )
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="overrides every trial takes")


def run_tune(args) -> int:
    _optuna()
    if args.parallel < 1 or args.trials < 1:
        raise ConfigError(f"--parallel and --trials: at least 1, got {args.parallel} and {args.trials}")
    if args.best is not None:
        tuner = Tuner(args, [])
        if not (tuner.path / "tune.json").is_file():
            raise UserError(f"{tuner.path}: no search here (tune.json missing)")
        show_best(tuner, open_study(tuner.storage, tuner.seed, "none"), args.best)
        return 0
    if not args.space:
        raise ConfigError("--space: the search space file is required (or --best K to show results)")
    tuner = Tuner(args, read_space(args.space, args.config, args.overrides))
    study = tuner.open()
    user_threads = load_config(args.config, args.overrides).run.threads > 0
    print(f"tune {tuner.path}: {args.trials} trials, {args.parallel} worker(s), study in {tuner.storage}", flush=True)
    with Signals(signal.SIGUSR1) as signals:  # USR1: Slurm's notice before a preemption
        workers = [
            threading.Thread(target=tuner.work, args=(slot, user_threads), daemon=True) for slot in slots(args.parallel)
        ]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            if signals.received is not None:
                tuner.stopping.set()
            time.sleep(0.2)
    states = _states()
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in (states.COMPLETE, states.PRUNED, states.FAIL)}
    if signals.received is not None:
        print(f"tune {tuner.path}: stopped by {signal.Signals(signals.received).name}; the same command resumes it")
        return 128 + signals.received
    print(
        f"tune {tuner.path}: {counts['complete']} finished, {counts['pruned']} pruned, {counts['fail']} failed; "
        f"the best: cifar-dist tune --out {tuner.path} --best 3"
    )
    return 1 if counts["fail"] else 0
