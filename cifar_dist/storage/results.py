"""What a finished run leaves in its directory: its weights, confusion matrix and plots and, last,
``summary.json``, whose step says which training it is the result of (docs/runs.md)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cifar_dist.storage import plots
from cifar_dist.storage.checkpoint import save_weights
from cifar_dist.storage.files import write_json_atomic


def time_to_target(history: list[dict], target: float) -> dict:
    """``time_to_target_s`` and ``epochs_to_target`` from the rows (None: not reached; {}: no target)."""
    if not target:
        return {}
    elapsed = 0.0
    for row in history:
        elapsed += row["epoch_time_s"]
        if row.get("test_acc") is not None and row["test_acc"] >= target:
            return {"target_acc": target, "time_to_target_s": elapsed, "epochs_to_target": row["epoch"]}
    return {"target_acc": target, "time_to_target_s": None, "epochs_to_target": None}


def results_of_step(run_dir: Path, step: int) -> bool:
    """Whether ``run_dir``'s summary.json is that of training that ended at ``step``."""
    try:
        written = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and written.get("steps") == step


def write_results(run_dir: Path, module: torch.nn.Module, summary: dict, confusion: list, draw: bool) -> None:
    """``module``'s weights, the confusion matrix, the plots when ``draw``, then summary.json."""
    save_weights(module, run_dir / "model.safetensors")
    matrix = {"classes": list(plots.CLASSES), "rows_true_cols_pred": confusion}
    write_json_atomic(run_dir / "confusion_matrix.json", matrix, indent=None)
    if draw:
        plots.draw_run(run_dir)
    write_json_atomic(run_dir / "summary.json", summary)
