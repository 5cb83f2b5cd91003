"""`make gpu-check` is wired (a CPU dry run of every step), and its pieces refuse bad input:
the CIFAR-10 JPEG archive importer and the benchmark's batch sizes."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from conftest import REPO, SHARED_ARCHIVE, cli_here, run


def test_a_bad_archive_is_refused_in_one_line(tmp_path):
    archive = tmp_path / "not-cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        blob = b"hello"
        info = tarfile.TarInfo("cifar10-jpeg/README.txt")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    res = cli_here("prepare", "--root", tmp_path / "data", "--from-archive", archive)
    assert res.returncode == 2
    assert res.stderr.strip() == f"cifar-dist: {archive}: no train_labels.txt; expected a CIFAR-10 JPEG archive"
    res = cli_here("prepare", "--root", tmp_path / "data", "--from-archive", tmp_path / "missing.tar.gz")
    assert res.returncode == 2 and "missing.tar.gz: cannot read the archive" in res.stderr


def test_the_archive_gives_the_exact_labels_in_the_official_order(cifar_root):
    """The training labels follow train_labels.txt (the official data_batch order);
    the test set holds every class 1,000 times."""
    from cifar_dist.data.cifar import load_cifar10

    with tarfile.open(SHARED_ARCHIVE) as tar:
        want = [int(v) for v in tar.extractfile("cifar10-jpeg/train_labels.txt").read().split()]
    train, test = (
        load_cifar10(cifar_root, train=True, verify=False),
        load_cifar10(cifar_root, train=False, verify=False),
    )
    assert train.labels.tolist() == want and train.images.shape == (50000, 3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_bench_refuses_a_batch_the_bn_group_does_not_divide():
    res = cli_here("bench", "--config", REPO / "configs" / "fast.yaml", "--batch-sizes", "128,96")
    assert res.returncode == 2
    assert res.stderr.strip() == "cifar-dist: --batch-sizes: 96 is not a multiple of model.bn_group=64"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_dry_run_runs_every_step(tmp_path, cifar_root):
    """On a CPU, --dry-run runs each step of `make gpu-check --full` at tiny sizes."""
    out = tmp_path / "check"
    res = run(
        ["bash", REPO / "scripts" / "gpu_check.sh", "--dry-run", "--full", "--out", out, "--data", cifar_root],
        timeout=500,
    )
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [
        "sync",
        "bench",
        "profile",
        "epoch",
        "airbench94",
        "paper-60-epochs",
        "fast-full",
    ]
    assert all(s["rc"] == 0 for s in report["steps"]), report["steps"]
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert len(bench["rows"]) == 2 + 8  # 2 baselines; compile off/on x 2 batches x torch/gpu loaders
    assert json.loads((out / "sync.json").read_text())["control_reads"] == 5
    profiled = out / "profile-bench" / "profile" / "eager_bf16_channels_last_b64_synthetic"
    assert (profiled / "rank0.pt.trace.json.gz").is_file() and (profiled / "profile_summary.json").is_file()
    assert "test accuracy" in (out / "report.md").read_text() and "| bench | ok |" in res.stdout
