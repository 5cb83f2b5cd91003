"""The command line as users type it: overrides anywhere, one-line messages, --version, doctor."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings

import pytest
import yaml

from cifar_dist.config.loading import load_config
from cifar_dist.data import build_datasets
from cifar_dist.errors import one_line_warning

from conftest import REPO, SMOKE, base_env, cli_here, run

TINY = [
    "train.max_steps=2",
    "data.synthetic_train=256",
    "data.synthetic_test=128",
    "run.plots=false",
    "run.progress=false",
    "run.trackers=[]",
]


def test_version_and_doctor_print_what_a_bug_report_needs():
    import cifar_dist

    res = cli_here("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"cifar-dist {cifar_dist.__version__}"
    res = cli_here("doctor", "--config", SMOKE)
    assert res.returncode == 0, res.stderr
    facts, _, env = res.stdout.partition("\n\n")
    fields = [line.split()[0] for line in facts.splitlines()]
    for field in (
        "cifar_dist",
        "python",
        "platform",
        "torch",
        "accelerate",
        "deepspeed",
        "ffcv",
        "numpy",
        "CUDA",
        "CPU",
        "accelerator",
        "memory",
        "CIFAR-10",
        "Slurm",
    ):
        assert field in fields, res.stdout
    assert "synthetic" in res.stdout  # the smoke recipe needs no files
    assert all(f"{cmd} " in res.stdout for cmd in ("sbatch", "srun", "scontrol"))
    assert "accelerate command " in facts and "accelerate config " in facts
    # torch.utils.collect_env's report comes last, after the default accelerate config if there is one
    assert "\ntorch.utils.collect_env:\nPyTorch version: " in res.stdout and "Traceback" not in res.stdout


def test_doctor_reports_a_failing_or_hanging_collect_env_in_one_line(monkeypatch):
    import threading

    import torch.utils.collect_env

    from cifar_dist.cli import doctor

    def broken():
        raise RuntimeError("no locale\nsecond line")

    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", broken)
    assert doctor.torch_env() == "not available: RuntimeError: no locale"
    release = threading.Event()
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: release.wait(30) and "late")
    try:
        assert doctor.torch_env(timeout_s=0.2) == "not available: not finished after 0.2 s (a command it runs hangs)"
    finally:
        release.set()


def test_doctor_shows_the_default_accelerate_config(tmp_path):
    from cifar_dist.cli.doctor import accelerate_config

    path = tmp_path / "default_config.yaml"
    line, settings = accelerate_config(path)
    assert line.startswith(f"none at {path}") and settings == []
    path.write_text(
        yaml.safe_dump(
            {"distributed_type": "MULTI_GPU", "num_processes": 8, "mixed_precision": "bf16"}, sort_keys=False
        )
    )
    assert accelerate_config(path) == (
        str(path),
        ["  distributed_type: MULTI_GPU", "  num_processes: 8", "  mixed_precision: bf16"],
    )
    path.write_text("[not: a mapping")
    assert accelerate_config(path) == (f"{path}: unreadable (ParserError)", [])


def test_overrides_may_come_before_between_and_after_options(tmp_path):
    res = cli_here("config", "train.lr=0.5", "--config", SMOKE, "train.epochs=7")
    cfg = yaml.safe_load(res.stdout)
    assert res.returncode == 0 and cfg["name"] == "smoke" and (cfg["train"]["lr"], cfg["train"]["epochs"]) == (0.5, 7)
    out = tmp_path / "run"
    res = cli_here("train", "--config", SMOKE, "train.max_steps=2", "--out", out, *TINY[1:])
    assert res.returncode == 0, res.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 2 and saved["data"]["synthetic_test"] == 128
    res = cli_here("eval", "data.eval_batch_size=32", "--checkpoint", out, "data.synthetic_test=64")
    assert res.returncode == 0 and "on 64 images" in res.stdout, res.stdout + res.stderr
    # bench: an override after the options is read (here refused, naming where it came from)
    res = cli_here("bench", "--config", SMOKE, "--steps", "1", "train.lr=.inf", "--repeats", "1")
    assert res.returncode == 2
    assert res.stderr.strip() == "cifar-dist: command line: train.lr: expected a finite number, got inf"
    res = cli_here("train", "--config", SMOKE, "--bogus", "a=1")
    assert res.returncode == 2 and "unrecognized arguments: --bogus" in res.stderr


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_floats_are_refused_up_front(tmp_path, value):
    res = cli_here("train", "--config", SMOKE, "--out", tmp_path / "r", f"train.lr={value}")
    assert res.returncode == 2 and not (tmp_path / "r").exists()
    assert res.stderr.strip().startswith("cifar-dist: command line: train.lr: expected a finite number, got")
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  mean: [0.5, .nan, 0.5]\n")
    res = cli_here("config", "--config", path)
    assert (
        res.returncode == 2
        and res.stderr.strip() == f"cifar-dist: {path}: data.mean: expected a finite number, got nan"
    )


def test_a_cross_key_error_names_where_the_value_came_from(tmp_path):
    res = cli_here("config", "--config", REPO / "configs" / "seed.yaml", "model.widths=[66,132]")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("cifar-dist: command line: model.widths and model.blocks must be")
    path = tmp_path / "widths.yaml"
    path.write_text("model:\n  widths: [66, 132]\n")
    res = cli_here("config", "--config", path)
    assert res.stderr.strip().startswith(f"cifar-dist: {path}: model.widths and model.blocks must be")


def test_help_says_what_the_defaults_are():
    for command in ("train", "bench"):
        res = cli_here(command, "--help")
        text = " ".join(res.stdout.split())
        assert res.returncode == 0 and "configs/seed.yaml is the paper's" in text
        assert "defaults are the paper's recipe" not in text


def test_a_copy_of_cifar10_is_named_once_in_one_line(cifar_root):
    """`prepare` says it in its report line (no warning besides); training warns in one line
    (test_python_train_py_takes_overrides_anywhere_and_tells_how_long)."""
    res = cli_here("prepare", "--root", cifar_root, "--no-download")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.strip().endswith("md5 differs for 6 files: not the official files (a rebuilt or modified copy)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_datasets(load_config(None, [f"data.root={cifar_root}"]))
    assert len(caught) == 1  # one warning for the six files, shown as one line
    err, w = io.StringIO(), caught[0]
    with contextlib.redirect_stderr(err):
        one_line_warning(w.message, w.category, w.filename, w.lineno)
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("cifar-dist: warning: ")
    assert "differ from the official CIFAR-10 checksums" in err.getvalue()


@pytest.mark.slow
def test_python_train_py_takes_overrides_anywhere_and_tells_how_long(tmp_path, cifar_root):
    """`python cifar_dist/train.py` with overrides between options, on the JPEG rebuild of
    CIFAR-10: one md5 warning line, the estimated time, and summary.json naming the data."""
    out = tmp_path / "run"
    res = run(
        [
            sys.executable,
            REPO / "cifar_dist" / "train.py",
            "--config",
            REPO / "configs" / "cpu_quick.yaml",
            f"data.root={cifar_root}",
            "--out",
            out,
            "train.max_steps=30",
            "run.progress=false",
            "run.plots=false",
        ],
        env=base_env(PYTHONWARNINGS="default"),
    )
    warnings = [ln for ln in res.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("cifar-dist: warning: "), res.stderr
    assert "check_md5" not in res.stderr
    assert "estimated time to finish:" in res.stdout and "for 10 more steps" in res.stdout, res.stdout
    assert "1 x cpu, single process" in res.stdout
    data = json.loads((out / "summary.json").read_text())["data"]
    assert data["official"] is False and data["source"].endswith("cifar-10-batches-py") and len(data["md5"]) == 32


def test_a_sweep_checks_every_member_before_running_any(tmp_path):
    """A bad value fails its members only (recorded as train would: exit 2, its error line);
    a mistake every member shares (an unknown key) stops the sweep at once, in one line."""
    out = tmp_path / "sweep"
    res = cli_here("sweep", "--config", SMOKE, "train.lr=0.1,nope", "--out", out, "--plan-only")
    assert res.returncode == 0, res.stderr
    members = {m["name"]: m for m in json.loads((out / "sweep.json").read_text())["members"]}
    assert members["lr=0.1-seed=0"]["state"] == "pending"
    assert (members["lr=nope-seed=0"]["state"], members["lr=nope-seed=0"]["exit_code"]) == ("failed", 2)
    assert members["lr=nope-seed=0"]["error"] == "cifar-dist: command line: train.lr: expected a number, got 'nope'"
    res = cli_here("sweep", "--config", SMOKE, "train.lrr=0.1,0.2", "--out", tmp_path / "other", "--plan-only")
    assert res.returncode == 2 and res.stderr.strip() == "cifar-dist: command line: unknown key 'train.lrr'"
    assert not (tmp_path / "other").exists()


def test_resume_needs_the_run_directory_and_names_candidates(tmp_path):
    res = cli_here("train", "--config", SMOKE, "--resume", "name=no_such_recipe")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "cifar-dist: --resume: name the run to continue with --out DIR (no run of 'no_such_recipe' under runs/)"
    ]
    res = cli_here("train", "--out", tmp_path / "nothing", "--resume")
    assert res.returncode == 2 and not (tmp_path / "nothing").exists()
    assert res.stderr.strip() == (
        f"cifar-dist: --resume: {tmp_path / 'nothing'} does not exist: no run to continue "
        "(give --config to start one there)"
    )


def test_resume_alone_takes_the_saved_config_and_a_conflict_names_both_values(tmp_path):
    out = tmp_path / "run"
    res = cli_here("train", "--config", SMOKE, "--out", out, *TINY, "train.lr=0.05")
    assert res.returncode == 0, res.stderr
    before = (out / "model.safetensors").read_bytes()
    res = cli_here("train", "--out", out, "--resume", "train.lr=0.5", "train.epochs=3")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"cifar-dist: {out / 'config.yaml'}: cannot resume with a different config (train.epochs: saved 2, now 3; "
        f"train.lr: saved 0.05, now 0.5); `--out {out} --resume` alone continues with the saved config"
    ]
    assert (out / "model.safetensors").read_bytes() == before
    res = cli_here("train", "--out", out, "--resume", "run.progress=false")  # a result-free key may change
    assert res.returncode == 0 and res.stdout.strip().endswith("already finished (finished, step 2); nothing to do")
    res = cli_here("train", "--out", out, "--resume", "run.progress=false", "train.max_steps=3")  # extended
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stdout and "smoke:" in res.stdout  # the saved recipe, by name
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.05


def test_a_resume_names_a_changed_group_whole_and_lets_a_result_free_group_change():
    """train.ema turned off, or its decay changed, is one difference of the group, shown as an
    override writes it; run.profile (result-free) may come and go, eval.tta may change when only
    the final evaluation uses it."""
    from dataclasses import asdict

    from cifar_dist.storage.rundir import _short, config_changes

    def config(*overrides):
        return asdict(load_config(SMOKE, list(overrides)))

    saved = config("train.ema.decay=0.9")
    assert [(k, _short(a), _short(b)) for k, a, b in config_changes(saved, config())] == [
        ("train.ema", "{decay: 0.9, every_steps: 1, warmup_steps: 0}", "null")
    ]
    assert [k for k, _, _ in config_changes(saved, config("train.ema.decay=0.8", "train.lr=0.5"))] == [
        "train.ema",
        "train.lr",
    ]
    assert config_changes(saved, config("train.ema.decay=0.9", "run.profile.steps=2", "run.trackers=[]")) == []
    # the final evaluation's TTA may change, unless every epoch's evaluation uses it
    assert config_changes(config("eval.tta=flip"), config("eval.tta=flip_translate")) == []
    every = config("eval.tta=flip", "eval.tta_every_epoch=true")
    assert config_changes(every, config("eval.tta=flip_translate", "eval.tta_every_epoch=true")) == [
        ("eval.tta", "flip", "flip_translate")
    ]


def test_a_result_free_key_that_changes_the_result_of_a_config_is_held_fixed_there():
    """eval.every_epochs is result-free, except when eval.target_acc is set: the evaluations
    then time the target and, with eval.stop_at_target, end the run. There --resume refuses a
    change of it and compare keeps runs that differ in it apart; elsewhere both let it go."""
    from dataclasses import asdict

    from cifar_dist.config.schema import RESULT_WHEN, flatten_keys, result_free_keys
    from cifar_dist.experiments.compare import group_runs
    from cifar_dist.storage.rundir import config_changes

    def config(*overrides):
        return asdict(load_config(SMOKE, list(overrides)))

    assert {key for key, _, _ in RESULT_WHEN} <= result_free_keys()
    target = ("eval.target_acc=0.9", "eval.stop_at_target=true")
    for fixed, extra in [(False, ()), (True, target), (True, target[:1])]:
        a, b = config(*extra), config("eval.every_epochs=2", *extra)
        assert bool(config_changes(a, b)) == fixed and bool(config_changes(b, a)) == fixed
        runs = [{"config": flatten_keys(c), "summary": {}, "dir": f"r{i}"} for i, c in enumerate((a, b))]
        assert len(group_runs(runs)) == (2 if fixed else 1)
    assert config_changes(config(*target), config(*target, "run.plots=false", "checkpoint.keep=5")) == []


def test_training_without_a_config_says_which_recipe_it_runs(tmp_path):
    res = cli_here(
        "train",
        "--out",
        tmp_path / "r",
        "data.synthetic=true",
        "data.synthetic_train=64",
        "data.synthetic_test=32",
        "model.widths=[8,16,32]",
        "model.blocks=[1,1,1]",
        "train.batch_size=16",
        "train.max_steps=1",
        "run.precision=fp32",
        "run.progress=false",
        "run.plots=false",
        "run.trackers=[]",
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[0].startswith(
        "cifar-dist: no --config: training the built-in defaults: the paper's model and optimizer for 60 epochs"
    )


def test_prepare_quiet_says_nothing_when_the_data_is_in_place(cifar_root):
    res = cli_here("prepare", "--root", cifar_root, "--no-download", "--quiet")
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""


def test_doctor_asks_slurm_whether_it_answers():
    res = cli_here("doctor")
    slurm = next(line for line in res.stdout.splitlines() if line.startswith("Slurm"))
    if "sinfo yes" in slurm:
        assert "controller answers" in slurm or "controller does not answer" in slurm, slurm
    cpu = next(line for line in res.stdout.splitlines() if line.startswith("CPU"))
    assert "bf16 units" in cpu and "run.precision=auto picks" in cpu


def _snapshot(run_dir) -> dict:
    return {
        p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def test_resume_never_erases_a_finished_run_and_overwrite_only_replaces_run_directories(tmp_path):
    import shutil

    out = tmp_path / "run"
    assert cli_here("train", "--config", SMOKE, "--out", out, *TINY).returncode == 0
    shutil.rmtree(out / "checkpoints")
    before = _snapshot(out)
    res = cli_here("train", "--out", out, "--resume")
    assert res.returncode == 2 and res.stderr.strip() == (
        f"cifar-dist: {out}: a finished run with no usable checkpoint: --resume has nothing to continue, and "
        "starting again would replace its results; pass --overwrite to train it again"
    )
    assert _snapshot(out) == before
    home = tmp_path / "not_a_run"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    res = cli_here("train", "--config", SMOKE, "--out", home, "--overwrite", *TINY)
    assert res.returncode == 2 and "not a run directory (no config.yaml) and not empty" in res.stderr
    assert (home / "thesis.tex").read_text() == "years of work"


def test_an_out_path_that_cannot_be_a_run_directory_is_one_line(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, fragment in (
        (a_file, "exists and is not a directory"),
        (a_file / "run", "cannot create the run directory"),
        ("/proc/self/cifar_dist_run", "cannot create the run directory"),
    ):
        res = cli_here("train", "--config", SMOKE, "--out", out, *TINY)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert fragment in res.stderr and str(out) in res.stderr
    assert a_file.read_text() == "x"


def test_report_skips_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(SMOKE, run_dir / "config.yaml")
    row = json.dumps(
        {
            "epoch": 1,
            "step": 64,
            "train_loss": 2.0,
            "train_acc": 0.3,
            "lr": 0.1,
            "epoch_time_s": 1.0,
            "images_per_s": 10.0,
        }
    )
    (run_dir / "metrics.jsonl").write_text(row + "\n" + row[:25])  # a write cut short
    res = cli_here("report", run_dir)
    assert res.returncode == 0, res.stderr
    metrics = run_dir / "metrics.jsonl"
    assert res.stderr.strip() == f"cifar-dist: warning: {metrics}: line 2 is torn (a write cut short); skipped"
    (run_dir / "metrics.jsonl").write_text("[1, 2]\n" + row + "\n")
    res = cli_here("report", run_dir)
    assert res.returncode == 2 and res.stderr.strip() == f"cifar-dist: {metrics}: line 1 is not a metrics row"
    (run_dir / "metrics.jsonl").write_text(row + "\n")
    (run_dir / "confusion_matrix.json").write_text('{"rows_true_cols_pred": [[1, 2]]}')
    res = cli_here("report", run_dir)
    assert res.returncode == 2 and "is not a 10 x 10 table of counts" in res.stderr


def test_sweep_members_get_one_directory_per_value_and_a_damaged_sweep_file_is_named(tmp_path):
    out = tmp_path / "sweep"
    res = cli_here("sweep", "--config", SMOKE, "name=a/b,a_b", "--out", out, "--plan-only")
    assert res.returncode == 0, res.stderr
    members = json.loads((out / "sweep.json").read_text())["members"]
    names = [m["name"] for m in members]
    assert len(set(names)) == 2 and all(n.startswith("name=a_b-seed=0-") for n in names)  # the same readable form
    long = "x" * 400
    res = cli_here("sweep", "--config", SMOKE, f"name={long},y", "--out", tmp_path / "long", "--plan-only")
    assert res.returncode == 0, res.stderr
    names = [m["name"] for m in json.loads((tmp_path / "long" / "sweep.json").read_text())["members"]]
    assert names[1] == "name=y-seed=0" and len(names[0]) <= 120
    (out / "sweep.json").write_text('{"members": 5}')
    res = cli_here("sweep", "--config", SMOKE, "name=a/b,a_b", "--out", out, "--plan-only")
    assert res.returncode == 2 and res.stderr.strip() == (
        f"cifar-dist: {out / 'sweep.json'}: not a sweep file (config, members with name and overrides); remove it "
        "to plan the sweep again"
    )


NUMBERS = {  # each numeric option of bench, and values none of them can use (scripts/plan.py's: test_scaling.py)
    ("bench", "--steps"): ["0", "-1", "nan", "2.5"],
    ("bench", "--warmup"): ["-1", "inf"],
    ("bench", "--repeats"): ["0", "-3"],
    ("bench", "--batch-sizes"): ["0", "-4", "64,0", ","],
    ("bench", "--workers"): ["-1"],
}


@pytest.mark.parametrize("command, option", list(NUMBERS))
def test_every_numeric_argument_refuses_what_no_command_can_use_in_one_line(command, option, tmp_path):
    """Zero, negative, NaN, infinity, a fraction where a count is meant, an empty list: one
    line naming the option and the value, exit 2, before anything runs or is written."""
    for value in NUMBERS[command, option]:
        res = cli_here(command, f"{option}={value}", "--out", tmp_path / "out")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, (value, res.stderr)
        assert lines[0].startswith(f"cifar-dist: {command}: argument {option}: expected ")
        assert any(repr(part) in lines[0] for part in [value, *value.split(",")])  # the value, or its bad item
        assert not (tmp_path / "out").exists()


def test_a_damaged_archive_is_one_line_naming_it(tmp_path):
    """prepare --from-archive with a cut-off gzip, a folder, labels that are not numbers and
    an image that is not one: DataError, exit 2, one line."""
    import io
    import tarfile

    def archive(name, files):
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for member, data in files.items():
                info = tarfile.TarInfo(f"cifar/{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    labels = b"0\n" * 50_000
    whole = archive("whole.tar.gz", {"train_labels.txt": labels, "test_labels.txt": b"0\n" * 10_000})
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[:200])
    cases = [
        (cut, "cannot read the archive"),
        (tmp_path, "cannot read the archive"),
        (archive("words.tar.gz", {"train_labels.txt": b"cat\n" * 5}), "train_labels.txt: expected whole-number labels"),
        (
            archive("notjpeg.tar.gz", {"train_labels.txt": labels, "train/airplane/0000.jpg": b"not a jpeg"}),
            "train/airplane/0000.jpg: not a readable image",
        ),
    ]
    for path, fragment in cases:
        res = cli_here("prepare", "--from-archive", path, "--root", tmp_path / "root")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and fragment in lines[0], res.stderr


def test_an_unknown_command_or_option_is_one_line():
    for argv, fragment in [
        (["nosuchcmd"], "argument command: invalid choice: 'nosuchcmd'"),
        (["bench", "--steps"], "argument --steps: expected one argument"),
    ]:
        res = cli_here(*argv)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and fragment in res.stderr, res.stderr


@pytest.mark.parametrize(
    "error",
    [
        lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        lambda: RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 61 GB."),
        lambda: MemoryError(),
    ],
)
def test_running_out_of_memory_is_one_line_and_exit_1(error, capsys):
    """A model or batch too large for the device or the host: one line naming it and what to
    shrink, exit 1, no traceback (a real allocation that large could bring the test machine down)."""
    from cifar_dist.errors import guarded

    def command(args):
        raise error()

    with pytest.raises(SystemExit) as stop:
        guarded(command, None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(lines) == 1
    assert lines[0].startswith("cifar-dist: out of memory") and "train.batch_size" in lines[0]


def test_a_folder_whose_path_is_not_utf8_is_refused_at_the_start_in_one_line(tmp_path):
    """A run, sweep, compare or bench folder named with bytes that are not UTF-8 (a file
    system allows them; plots, trackers and summaries cannot name them): one line, exit 2,
    before anything is trained or written, for every command that makes or reads one."""
    import os

    bad = tmp_path / os.fsdecode(b"run\xff")
    line = f"cifar-dist: {tmp_path}/run\\udcff: the path is not valid UTF-8; choose a folder whose name is"
    for argv in [
        ("train", "--config", SMOKE, "--out", bad, *TINY),
        ("sweep", "--config", SMOKE, "--out", bad, "--plan-only"),
        ("compare", tmp_path, "--out", bad),
        ("eval", "--checkpoint", bad),
    ]:
        res = cli_here(*argv)
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [line], (argv, res.stderr)
    assert sorted(os.listdir(tmp_path)) == []
