"""Using what was trained: predict on image files, exports checked against PyTorch, the shared-model
folder, and the Python API (``cifar_dist.train`` and ``cifar_dist.predict``)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cifar_dist
from cifar_dist.data import CLASSES, build_datasets, normalize
from cifar_dist.inference import export as export_module
from cifar_dist.inference.evaluate import evaluate_model
from cifar_dist.inference.hub import CifarClassifier
from cifar_dist.inference.predict import TrainedModel

from conftest import REF_ARGS, SMOKE, cli_here, load_weights, summary

# REF_ARGS's overrides: the reference run of the end-to-end tests, trained here in this process
SMOKE_OVERRIDES = [str(a) for a in REF_ARGS[2:]]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A smoke run (48 steps, 95% on its synthetic test set) trained in this process."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = cifar_dist.train(SMOKE, SMOKE_OVERRIDES, out)
    assert result.code == 0 and result.summary["test_acc"] > 0.5
    return out


def _write_images(run_dir, folder, n=12):
    """The run's first ``n`` test images as files, PNG and JPEG in turn; returns (paths, pixels
    read back from each file) — a JPEG's pixels are not the array's, so eval sees the file's."""
    _, test_set, _ = build_datasets(TrainedModel.load(run_dir).cfg)
    folder.mkdir(parents=True, exist_ok=True)
    paths, pixels = [], []
    for i in range(n):
        path = folder / f"{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(test_set.images[i].permute(1, 2, 0).numpy()).save(path, quality=90)
        paths.append(path)
        pixels.append(torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1))
    return paths, torch.stack(pixels)


def _eval_top1(run_dir, pixels: torch.Tensor) -> list[str]:
    """What `cifar-dist eval` computes for these pixels: the run's model on its normalized input."""
    trained = TrainedModel.load(run_dir)
    cfg = trained.cfg
    with torch.no_grad():
        logits = trained.model(normalize(pixels, cfg.data.mean, cfg.data.std, cfg.run.channels_last))
    return [CLASSES[i] for i in logits.argmax(1).tolist()]


def test_predict_on_png_and_jpeg_files_gives_evals_top1(run_dir, tmp_path):
    paths, pixels = _write_images(run_dir, tmp_path / "images")
    res = cli_here("predict", run_dir, tmp_path / "images", "--json", "--top-k", "3")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["predictions"]
    assert [r["file"] for r in rows] == [str(p) for p in paths]
    assert [r["top_k"][0]["class"] for r in rows] == _eval_top1(run_dir, pixels)
    for r in rows:
        probs = [c["probability"] for c in r["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6

    text = cli_here("predict", run_dir, paths[0], paths[1])
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].startswith(f"{paths[0]}: ")


def test_a_larger_image_is_center_cropped_and_resized_to_32(run_dir, tmp_path):
    """A 96x64 image: its center 64x64 square, resized to 32x32 (docs/runs.md#predict)."""
    from cifar_dist.inference.predict import read_image

    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    expected = Image.fromarray(big[:, 16:80]).resize((32, 32), Image.Resampling.BICUBIC)
    got = read_image(tmp_path / "big.png")
    assert got.shape == (3, 32, 32) and got.dtype == torch.uint8
    assert torch.equal(got, torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1))


def test_bad_files_are_one_line_each_and_the_rest_is_predicted(run_dir, tmp_path):
    paths, _ = _write_images(run_dir, tmp_path / "good", n=2)
    (tmp_path / "text.png").write_text("not an image")
    whole = paths[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty").mkdir()
    bad = [tmp_path / "text.png", tmp_path / "cut.jpg", tmp_path / "empty", tmp_path / "missing.png"]
    res = cli_here("predict", run_dir, *paths, *bad)
    assert res.returncode == 0
    assert len(res.stdout.splitlines()) == 2
    *errors, timing = res.stderr.splitlines()
    assert timing.startswith("2 images in ")
    assert len(errors) == 4
    assert errors[0] == f"cifar-dist: {tmp_path / 'text.png'}: not an image"
    assert errors[1].startswith(f"cifar-dist: {tmp_path / 'cut.jpg'}: unreadable image (")
    assert errors[2].startswith(f"cifar-dist: {tmp_path / 'empty'}: no image files in this folder")
    assert errors[3] == f"cifar-dist: {tmp_path / 'missing.png'}: not found"

    none = cli_here("predict", run_dir, *bad)
    assert none.returncode == 2
    assert none.stderr.splitlines()[-1] == "cifar-dist: no image could be predicted (4 paths skipped)"


def test_predict_uses_the_ema_weights_of_a_run_that_evaluated_them(tmp_path):
    """From a checkpoint of a run with eval.use_ema, whose model.safetensors holds the training
    weights: the checkpoint's EMA weights, which the run evaluated, not those."""
    from safetensors.torch import load_file

    ema_args = ["train.max_steps=12", "train.ema.decay=0.9", "eval.use_ema=true", "checkpoint.every_steps=6"]
    result = cifar_dist.train(SMOKE, [*SMOKE_OVERRIDES[:1], *ema_args, "run.plots=false"], tmp_path / "run")
    ckpt = sorted((result.run_dir / "checkpoints").iterdir())[-1]
    trained = TrainedModel.load(ckpt)
    ema, training = load_file(ckpt / "ema.safetensors"), load_file(ckpt / "model.safetensors")
    state = trained.model.state_dict()
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    assert not all(torch.equal(state[k], training[k]) for k in training)
    assert "EMA" in trained.what


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported_program"])
@pytest.mark.parametrize("batch", [None, 64])
def test_each_export_matches_pytorch_within_1e_4_with_the_same_accuracy(run_dir, tmp_path, fmt, batch):
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed: pip install 'cifar_dist[export]'")
    out = tmp_path / f"model{export_module.FORMATS[fmt]}"
    args = ["export", run_dir, "--format", fmt, "--out", out] + (["--batch-size", batch] if batch else [])
    res = cli_here(*args)
    assert res.returncode == 0, res.stderr
    check = json.loads((tmp_path / f"{out.name}.check.json").read_text())
    assert check["passed"] and check["max_abs_diff"] <= 1e-4
    assert check["images"] == 1024 and check["accuracy_export"] == check["accuracy_pytorch"]
    assert check["batch"] == ("dynamic" if batch is None else batch)
    assert check["batchnorm_folded"] == (fmt != "exported_program")
    assert check["accuracy_pytorch"] == pytest.approx(summary(run_dir)["test_acc"], abs=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, f"{out.name}.check.json"])


def test_an_export_that_fails_its_check_is_not_written(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # no export can pass
    out = tmp_path / "model.pt2"
    res = cli_here("export", run_dir, "--format", "exported_program", "--out", out)
    assert res.returncode == 2
    assert res.stderr.startswith(f"cifar-dist: {out}: not written: the exported_program export's logits")
    assert list(tmp_path.iterdir()) == []


def test_the_shared_model_folder_loads_back_the_same_bits_and_accuracy(run_dir, tmp_path):
    folder = tmp_path / "shared"
    res = cli_here("export", run_dir, "--format", "hub", "--out", folder)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "config.yaml", "model.safetensors"]
    card = (folder / "README.md").read_text()
    assert "library_name: cifar_dist" in card and f"{100 * summary(run_dir)['test_acc']:.2f}%" in card

    model = CifarClassifier.from_pretrained(folder)
    run_weights = load_weights(run_dir)
    loaded = model.model.state_dict()
    assert loaded.keys() == run_weights.keys()
    assert all(torch.equal(loaded[k], run_weights[k]) for k in loaded)
    _, test_set, _ = build_datasets(model.cfg)
    acc = evaluate_model(model.model, test_set, model.cfg, torch.device("cpu"))["acc"]
    assert acc == summary(run_dir)["test_acc"]

    again = tmp_path / "again"  # what from_pretrained loaded saves the same weights
    model.save_pretrained(again)
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_the_python_predict_takes_arrays_files_and_a_run(run_dir, tmp_path):
    paths, pixels = _write_images(run_dir, tmp_path / "images", n=4)
    from_files = cifar_dist.predict(run_dir, paths)
    hwc = pixels.permute(0, 2, 3, 1).numpy()  # CIFAR-10's own array layout
    from_array = cifar_dist.predict(run_dir, hwc)
    assert from_files.shape == (4, 10) and torch.equal(from_files, from_array)
    assert [CLASSES[i] for i in from_files.argmax(1).tolist()] == _eval_top1(run_dir, pixels)
    with pytest.raises(ValueError, match=r"images: uint8 N x 3 x 32 x 32 or N x 32 x 32 x 3 expected"):
        cifar_dist.predict(run_dir, np.zeros((2, 28, 28), dtype=np.uint8))


@pytest.mark.slow
@pytest.mark.timeout(900)  # two runs in this process and the reference's, on a busy machine
def test_train_twice_in_one_process_gives_the_cli_runs_bits(reference, tmp_path):
    """The notebook case: two calls, each equal to the same run through the command line."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    for i in range(2):
        result = cifar_dist.train(SMOKE, SMOKE_OVERRIDES, tmp_path / f"run{i}")
        assert result.code == 0 and result.run_dir == tmp_path / f"run{i}"
        assert result.summary == summary(result.run_dir)
        assert (result.run_dir / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    assert not torch.distributed.is_initialized()


@pytest.mark.long
@pytest.mark.timeout(2400)
@pytest.mark.skipif(
    os.environ.get("CIFAR_DIST_LONG") != "1",
    reason="CIFAR_DIST_LONG=1 trains the CPU demo on real CIFAR-10 and checks every export on its 10,000 test images",
)
def test_exports_and_predict_on_the_real_cifar10_test_set(cifar_root, tmp_path, monkeypatch):
    """The checks on real images: each export over the 10,000 test images, and predict on them as
    PNG files beside a plain PyTorch loop over the same pixels (figures printed, not asserted)."""
    from cifar_dist.inference.predict import predict_files

    from conftest import REPO, base_env, cli

    run = tmp_path / "quick"
    quick = REPO / "configs" / "cpu_quick.yaml"
    cli("train", "--config", quick, "--out", run, "run.progress=false", "run.precision=fp32",
        env=base_env(CIFAR_DIST_DATA=cifar_root), timeout=1800)  # fmt: skip
    plain = summary(run)["test_acc"]  # fp32 and no TTA, as the checks
    for fmt in ["onnx", "torchscript", "exported_program"]:
        out = tmp_path / f"model{export_module.FORMATS[fmt]}"
        cli("export", run, "--format", fmt, "--out", out, env=base_env(CIFAR_DIST_DATA=cifar_root), timeout=1200)
        check = json.loads((tmp_path / f"{out.name}.check.json").read_text())
        print(
            f"{fmt}: max |logit difference| {check['max_abs_diff']:.2e} over {check['images']} images, accuracy "
            f"{100 * check['accuracy_export']:.2f}% (PyTorch {100 * check['accuracy_pytorch']:.2f}%)"
        )
        assert check["passed"] and check["images"] == 10000
        assert check["accuracy_pytorch"] == pytest.approx(plain, abs=1e-9)

    trained = TrainedModel.load(run)
    monkeypatch.setenv("CIFAR_DIST_DATA", str(cifar_root))  # in this process too
    _, test_set, _ = build_datasets(trained.cfg)
    folder = tmp_path / "png"
    folder.mkdir()
    for i in range(len(test_set)):
        Image.fromarray(test_set.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    started = time.perf_counter()
    rows, problems, model_s = predict_files(trained, [folder])
    total_s = time.perf_counter() - started
    cfg = trained.cfg
    with torch.no_grad():  # the reference: a plain loop over the same pixels, already in memory
        started = time.perf_counter()
        for s in range(0, len(test_set), 256):
            trained.model(normalize(test_set.images[s : s + 256], cfg.data.mean, cfg.data.std, cfg.run.channels_last))
        plain_s = time.perf_counter() - started
    right = sum(top[0][0] == CLASSES[int(y)] for (_, top), y in zip(rows, test_set.labels))
    print(
        f"predict: {len(rows)} PNG files in {total_s:.1f} s ({len(rows) / total_s:.0f} img/s with reading), "
        f"the model {len(rows) / model_s:.0f} img/s; plain PyTorch loop {len(test_set) / plain_s:.0f} img/s; "
        f"top-1 {100 * right / len(rows):.2f}%"
    )
    assert not problems and right / len(rows) == pytest.approx(plain)


@pytest.mark.slow
def test_the_python_api_example_runs_end_to_end(tmp_path):
    """examples/python_api.py as a user runs it (on the smoke recipe here: seconds, not minutes)."""
    from conftest import REPO, run

    res = run([sys.executable, REPO / "examples" / "python_api.py", tmp_path, SMOKE], timeout=600)
    assert "shared folder agrees: True" in res.stdout
    assert sum(line.startswith("test_") for line in res.stdout.splitlines()) == 6
    assert "model.onnx: logits within" in res.stdout or "onnxruntime" in res.stdout
