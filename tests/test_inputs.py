"""Bad and hostile input through the real command line: one line naming the culprit,
exit code 2, nothing of an earlier run lost, no payload ever run.

Config files (malformed YAML, unknown keys, wrong types, invalid values) are in
test_config.py, an existing run directory in test_train.py, a full disk in
test_reliability.py.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil

import pytest
import torch

from conftest import FAULT_ARG, REF_ARGS, SMOKE, assert_refused_by_its_ranks, cli, fault_env, rewind, torchrun
from helpers import _Payload, fake_cifar

pytestmark = pytest.mark.slow
STEPS = REF_ARGS[2:]  # the shared reference run's settings (conftest.REF_ARGS)


def _one_line(res) -> str:
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("cifar-dist: ")
    return lines[0]


def _snapshot(run_dir) -> dict:
    return {
        p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, reference):
    """The reference run as if stopped after its step-12 checkpoint (resuming it is what the
    tests attack)."""
    return rewind(reference, tmp_path_factory.mktemp("inputs") / "stopped", step=12)


@pytest.fixture
def victim(stopped_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    return out


def test_global_batch_not_divisible_by_the_world_size(tmp_path):
    out = tmp_path / "run"
    res = torchrun(
        2,
        "--config",
        SMOKE,
        "--out",
        out,
        "train.batch_size=65",
        "train.exact_reduce=false",
        "run.progress=false",
        check=False,
        timeout=600,
    )
    assert res.returncode != 0
    line = "train.batch_size: 65 is not divisible by 2 processes x train.accum_steps 1"
    assert_refused_by_its_ranks(res.stderr, line)
    assert not out.exists()


def test_missing_data_directory(tmp_path):
    root = tmp_path / "nowhere"
    line = _one_line(
        cli(
            "train",
            "--config",
            SMOKE,
            "--out",
            tmp_path / "run",
            "data.synthetic=false",
            f"data.root={root}",
            check=False,
        )
    )
    assert f"{root / 'cifar-10-batches-py'}: CIFAR-10 not found" in line
    assert "cifar-dist prepare" in line


def test_truncated_cifar_batch_file(tmp_path):
    fake_cifar(tmp_path / "data")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:3000])
    line = _one_line(
        cli(
            "train",
            "--config",
            SMOKE,
            "--out",
            tmp_path / "run",
            "data.synthetic=false",
            f"data.root={tmp_path / 'data'}",
            check=False,
        )
    )
    assert f"{batch}: truncated or corrupt CIFAR batch" in line


def test_cifar_batch_file_with_a_pickle_code_payload(tmp_path):
    marker = tmp_path / "pwned"
    fake_cifar(tmp_path / "data")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_4"
    with open(batch, "wb") as f:
        pickle.dump({b"data": _Payload(marker), b"labels": [1]}, f, protocol=2)
    line = _one_line(
        cli(
            "train",
            "--config",
            SMOKE,
            "--out",
            tmp_path / "run",
            "data.synthetic=false",
            f"data.root={tmp_path / 'data'}",
            check=False,
        )
    )
    assert f"{batch}: not a CIFAR batch (refused to load global posix.system" in line
    assert not marker.exists()


def test_corrupt_beton(tmp_path):
    pytest.importorskip("ffcv", reason="FFCV is not installed (pip install -e '.[ffcv]')")
    from cifar_dist.config.loading import load_config
    from cifar_dist.data import build_datasets
    from cifar_dist.data.beton import ensure_beton

    args = [f"data.root={tmp_path / 'data'}", "data.synthetic=false", "data.loader=ffcv"]
    fake_cifar(tmp_path / "data", n=64)
    beton, _ = ensure_beton(build_datasets(load_config(SMOKE, args))[0], tmp_path / "data" / "beton", "train", 1)
    raw = bytearray(beton.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    beton.write_bytes(bytes(raw))
    line = _one_line(cli("train", "--config", SMOKE, "--out", tmp_path / "run", *args, check=False))
    assert f"{beton}: corrupt .beton (sha256 differs from the manifest)" in line


def _consistent(ckpt) -> None:
    """Rewrite the checkpoint's manifest for its tampered files: a checkpoint made hostile on
    purpose, which the manifest (a guard against damage) cannot tell from a good one."""
    from cifar_dist.storage.checkpoint import write_manifest

    write_manifest(ckpt)


def test_checkpoint_of_another_model_shape(victim):
    before = _snapshot(victim)
    ckpt = victim / "checkpoints" / "step_00000012"
    from safetensors.torch import save_file

    from cifar_dist.config.loading import load_config
    from cifar_dist.model.resnet import build_model

    other = build_model(load_config(SMOKE, ["model.widths=[8,16,48]"]).model)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(ckpt / "model.safetensors"))
    _consistent(ckpt)  # a manifest that matches: the loader's own check must refuse the weights
    before = _snapshot(victim)
    line = _one_line(cli("train", "--config", SMOKE, "--out", victim, "--resume", *STEPS, check=False))
    assert f"{ckpt / 'model.safetensors'}: " in line and "has shape" in line and "this model needs" in line
    assert _snapshot(victim) == before


def test_checkpoint_with_a_pickle_code_payload(victim, tmp_path):
    marker = tmp_path / "pwned"
    optimizer_pt = victim / "checkpoints" / "step_00000012" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, optimizer_pt)
    _consistent(optimizer_pt.parent)  # a manifest that matches: weights_only loading must refuse it
    before = _snapshot(victim)
    line = _one_line(cli("train", "--config", SMOKE, "--out", victim, "--resume", *STEPS, check=False))
    assert f"{optimizer_pt}: refused to load" in line and "nothing in it was executed" in line
    assert not marker.exists()
    assert _snapshot(victim) == before


def test_two_runs_on_one_run_directory(victim):
    before = _snapshot(victim)
    fd = os.open(victim / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the first run holds while it trains
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        line = _one_line(cli("train", "--config", SMOKE, "--out", victim, "--resume", *STEPS, check=False))
    finally:
        os.close(fd)
    assert line == (
        f"cifar-dist: {victim}: run directory is in use by pid {os.getpid()}; wait for it or choose another --out"
    )
    assert _snapshot(victim) == before


LINKED_FILES = [".lock", "metrics.jsonl", "summary.json", "model.safetensors", "confusion_matrix.json", "config.yaml"]


def test_nothing_is_written_through_a_symbolic_link_in_a_run_or_sweep_directory(reference, tmp_path):
    """A received run directory whose files are links to a file of the user's outside it: the
    resumed run replaces each link with a file of its own and the outside file keeps its bytes.
    A folder cifar-dist writes into (checkpoints/, plots/, a sweep's logs/ and members) that is
    a link: refused in one line, nothing written. compare's and eval's outputs, and every atomic
    write (PREEMPTED, bench.json, scripts/plan.py --json), replace a link the same way."""
    from cifar_dist.storage.files import create_new, write_text_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    out = rewind(reference, tmp_path / "run", step=36)
    config = tmp_path / "config_outside.yaml"  # read by the resume: a link to a valid config
    config.write_bytes((out / "config.yaml").read_bytes())
    for name in LINKED_FILES:
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(config if name == "config.yaml" else victim)
    cli("train", "--out", out, "--resume", "train.max_steps=48", "run.plots=true")
    assert victim.read_text() == "the user's own file\n"
    assert config.read_bytes() == (reference / "config.yaml").read_bytes()
    assert not any((out / name).is_symlink() for name in LINKED_FILES)
    assert (out / "summary.json").is_file() and (out / "plots" / "loss.png").is_file()

    for name in ("compare.md", "compare.json", "eval.json"):
        (out / name).symlink_to(victim)
    assert cli("compare", out, "--out", out).returncode == 0
    assert cli("eval", "--checkpoint", out).returncode == 0
    assert victim.read_text() == "the user's own file\n" and not (out / "eval.json").is_symlink()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for folder in ("plots", "checkpoints"):
        run = rewind(reference, tmp_path / f"run_{folder}", step=36)
        shutil.rmtree(run / folder, ignore_errors=True)
        (run / folder).symlink_to(elsewhere, target_is_directory=True)
        line = _one_line(cli("train", "--out", run, "--resume", "run.plots=true", check=False))
        assert (
            line == f"cifar-dist: {run / folder}: a symbolic link; cifar-dist writes nothing through links (remove it)"
        )
    assert list(elsewhere.iterdir()) == []

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "logs").symlink_to(elsewhere, target_is_directory=True)
    args = ("sweep", "--config", SMOKE, "--out", sweep, "data.synthetic_train=256", "train.max_steps=1")
    assert _one_line(cli(*args, check=False)).endswith(
        f"{sweep / 'logs'}: a symbolic link; cifar-dist writes nothing through links (remove it)"
    )
    assert list(elsewhere.iterdir()) == []

    for write in (lambda p: write_text_atomic(p, "new"), lambda p: create_new(p).close()):
        link = tmp_path / "link"
        link.unlink(missing_ok=True)
        link.symlink_to(victim)
        write(link)
        assert not link.is_symlink() and victim.read_text() == "the user's own file\n"


def test_a_folder_where_a_run_writes_a_file_is_refused_before_training(reference, tmp_path):
    for name in ("summary.json", "metrics.jsonl", "model.safetensors"):
        out = rewind(reference, tmp_path / name, step=36)
        (out / name).unlink(missing_ok=True)
        (out / name).mkdir()
        before = _snapshot(out)
        line = _one_line(cli("train", "--out", out, "--resume", check=False))
        assert line == f"cifar-dist: {out / name}: a folder where the run writes a file; remove it"
        assert _snapshot(out) == before  # nothing trained, nothing written


def test_a_failure_before_the_first_checkpoint_leaves_no_half_run_behind(tmp_path):
    """A NaN at step 0 of a fresh run (found at the first control read, before any checkpoint):
    exit 1, one line that says the directory it made is gone, so the same --out starts again."""
    out = tmp_path / "run"
    res = cli("train", "--config", SMOKE, "--out", out, *STEPS, FAULT_ARG, env=fault_env("nan@0"), check=False)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("cifar-dist: ") and last.endswith(f"; nothing to keep, {out} removed"), last
    assert not out.exists()


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`python scripts/plan.py | head -1`: no traceback, the exit status of a program SIGPIPE ended."""
    import subprocess

    from conftest import BIN, REPO

    res = subprocess.run(
        f"{BIN / 'python'} {REPO / 'scripts' / 'plan.py'} --gpus 8,16,32,64,128,256,512 | head -c 10 >/dev/null; "
        "echo ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.stderr == "" and res.stdout.strip() in ("0", "141"), res.stderr
