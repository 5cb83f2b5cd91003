"""Export a run's evaluated model to ONNX, TorchScript or a torch.export ExportedProgram, its
normalization inside the graph; each file is checked against PyTorch before it is kept."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from cifar_dist.data import build_datasets, eval_batches
from cifar_dist.errors import UserError
from cifar_dist.inference.predict import SIZE, TrainedModel
from cifar_dist.storage.files import write_json_atomic

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported_program": ".pt2"}
TOLERANCE = 1e-4  # the most a logit of the exported model may differ from PyTorch's, in fp32
INPUT = "float32 N x 3 x 32 x 32, RGB pixel values 0-255 (uint8 values as floats); normalized inside"


class ExportError(UserError):
    """An export that failed its check, or a format whose package is missing."""


class Normalized(torch.nn.Module):
    """The model behind the run's normalization: pixels in, logits out (the exported graph)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: torch.nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def export(trained: TrainedModel, fmt: str, out: Path, batch_size: int | None = None, limit: int | None = None) -> dict:
    """Write ``trained`` in ``fmt`` to ``out`` (a fixed batch dimension of ``batch_size``, else a
    dynamic one) and ``out``.check.json; the file is kept only when the logits of the exported
    model match PyTorch's within ``TOLERANCE`` over the run's evaluation set (its first
    ``limit`` images) with the same accuracy. Returns the check's record."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require("onnxruntime", "onnxscript")
    cpu = trained.model.float().cpu().eval()
    module = Normalized(cpu, trained.cfg.data.mean, trained.cfg.data.std).eval()
    example = torch.zeros(batch_size or 2, 3, SIZE, SIZE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")  # torch.export wants its suffix
    try:
        started = time.perf_counter()
        WRITERS[fmt](module, example, tmp, dynamic=batch_size is None)
        export_s = time.perf_counter() - started
        run = LOADERS[fmt](tmp)
        record = _check(module, run, trained, batch_size, limit)
        record.update(
            format=fmt, file=out.name, input=INPUT, output="float32 N x 10 logits",
            batch="dynamic" if batch_size is None else batch_size, export_time_s=round(export_s, 2),
            weights=trained.what, batchnorm_folded=_batchnorm_folded(fmt, tmp, run),
        )  # fmt: skip
        if not record["passed"]:
            raise ExportError(
                f"{out}: not written: the {fmt} export's logits differ from PyTorch's by up to "
                f"{record['max_abs_diff']:.2e} (tolerance {TOLERANCE:g}), accuracy "
                f"{100 * record['accuracy_export']:.2f}% against {100 * record['accuracy_pytorch']:.2f}%"
            )
        record["sha256"] = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(out.with_name(out.name + ".check.json"), record)
    return record


def _require(*packages: str) -> None:
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(
            f"--format onnx needs {' and '.join(missing)}: pip install 'cifar_dist[export]' "
            "(onnx, onnxscript, onnxruntime)"
        )


@torch.no_grad()
def _check(module, run, trained: TrainedModel, batch_size: int | None, limit: int | None) -> dict:
    """Logits of the exported model (``run``) against the module's over the evaluation set."""
    _, eval_set, name = build_datasets(trained.cfg)
    if limit:
        eval_set = eval_set.slice(0, min(limit, len(eval_set)))
    worst, right_torch, right_export, count = 0.0, 0, 0, 0
    cfg = trained.cfg
    for x, y, valid in eval_batches(eval_set, 0, 1, batch_size or cfg.data.eval_batch_size, torch.device("cpu")):
        pixels = x.float()
        # PyTorch's logits as the run evaluated: in its memory layout, which convolutions round by
        layout = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
        ours, theirs = module(pixels.contiguous(memory_format=layout))[:valid], run(pixels)[:valid]
        worst = max(worst, float((ours - theirs).abs().max()))
        right_torch += int((ours.argmax(1) == y[:valid]).sum())
        right_export += int((theirs.argmax(1) == y[:valid]).sum())
        count += valid
    return {
        "eval_set": name,
        "images": count,
        "max_abs_diff": worst,
        "tolerance": TOLERANCE,
        "accuracy_pytorch": right_torch / max(count, 1),
        "accuracy_export": right_export / max(count, 1),
        "passed": worst <= TOLERANCE and right_torch == right_export,
    }


def _batchnorm_folded(fmt: str, path: Path, run) -> bool:
    """Whether no BatchNorm op is left in the written graph."""
    if fmt == "onnx":
        import onnx

        return all(node.op_type != "BatchNormalization" for node in onnx.load(str(path)).graph.node)
    if fmt == "torchscript":
        return "batch_norm" not in str(run.inlined_graph)
    return False  # an ExportedProgram keeps the module's ops


def _batch_dim(dynamic: bool):
    return {"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic else None


def _write_exported_program(module, example, path: Path, dynamic: bool) -> None:
    program = torch.export.export(module, (example,), dynamic_shapes=_batch_dim(dynamic))
    torch.export.save(program, str(path))


def _write_torchscript(module, example, path: Path, dynamic: bool) -> None:
    # tracing records the eval-mode graph; freezing folds BatchNorm into the convolutions
    traced = torch.jit.trace(module, example)
    torch.jit.save(torch.jit.freeze(traced), str(path))


def _write_onnx(module, example, path: Path, dynamic: bool) -> None:
    torch.onnx.export(
        module, (example,), str(path), input_names=["pixels"], output_names=["logits"],
        dynamic_shapes=_batch_dim(dynamic), dynamo=True, optimize=True, external_data=False, verbose=False,
    )  # fmt: skip


def _load_exported_program(path: Path):
    return torch.export.load(str(path)).module()


def _load_torchscript(path: Path):
    return torch.jit.load(str(path))


def _load_onnx(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"pixels": x.numpy()})[0])


WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "exported_program": _write_exported_program}
LOADERS = {"onnx": _load_onnx, "torchscript": _load_torchscript, "exported_program": _load_exported_program}
