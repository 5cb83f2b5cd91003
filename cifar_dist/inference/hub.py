"""A trained model in the Hugging Face Hub's layout: model.safetensors, config.json, a model card
(README.md), and the run's config.yaml, so that cifar_dist's own commands read the folder too."""

from __future__ import annotations

import json
import time
from pathlib import Path

from huggingface_hub import ModelCard, PyTorchModelHubMixin

from cifar_dist.config.loading import config_from_dict
from cifar_dist.inference.export import Normalized
from cifar_dist.inference.predict import TrainedModel
from cifar_dist.model.resnet import build_model, count_parameters
from cifar_dist.storage.checkpoint import load_weights, save_weights
from cifar_dist.storage.rundir import save_config

WEIGHTS = "model.safetensors"


class CifarClassifier(
    Normalized,
    PyTorchModelHubMixin,
    library_name="cifar_dist",
    tags=["image-classification", "cifar10"],
    pipeline_tag="image-classification",
):
    """A run's model behind its normalization: RGB pixels 0-255 (N x 3 x 32 x 32 floats) in,
    logits out. ``config`` is the run's config (config.json holds it); ``from_pretrained``
    takes a folder or, with network, a Hub repository; the weights file has the run's keys."""

    def __init__(self, config: dict, name: str = "cifar10"):
        cfg = config_from_dict(config, "config.json")
        super().__init__(build_model(cfg.model), cfg.data.mean, cfg.data.std)
        self.cfg, self.cfg.name = cfg, name
        self.card: str | None = None  # the model card save_pretrained writes

    @classmethod
    def of_run(cls, trained: TrainedModel, summary: dict | None = None) -> CifarClassifier:
        model = cls(trained.cfg.to_dict(), trained.cfg.name)
        model.model.load_state_dict(trained.model.state_dict())
        model.card = model_card(trained, summary or {})
        return model.eval()

    def _save_pretrained(self, save_directory: Path) -> None:
        save_weights(self.model, save_directory / WEIGHTS)
        save_config(self.cfg, save_directory / "config.yaml")

    @classmethod
    def _from_pretrained(
        cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token, map_location="cpu", **init
    ):
        weights = Path(model_id) / WEIGHTS
        if not Path(model_id).is_dir():  # a repository on the Hub
            from huggingface_hub import hf_hub_download

            weights = Path(
                hf_hub_download(
                    repo_id=model_id, filename=WEIGHTS, revision=revision, cache_dir=cache_dir,
                    force_download=force_download, local_files_only=local_files_only, token=token,
                )
            )  # fmt: skip
        model = cls(**init)
        load_weights(weights, model.model)
        return model.to(map_location).eval()

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        return ModelCard(self.card or f"# {self.cfg.name}\n\nA CIFAR-10 classifier trained with cifar_dist.\n")


def model_card(trained: TrainedModel, summary: dict) -> str:
    """README.md of a shared model: what it is, how well it did, on what, and how to load it."""
    cfg = trained.cfg
    acc = summary.get("test_acc")
    tta = summary.get("tta", "none")
    result = (
        f"{100 * acc:.2f}% on the {summary.get('eval_images', 10000):,} {summary.get('eval_set', 'test')} images "
        f"({'no TTA' if tta == 'none' else f'{tta} TTA'}), one run, seed {summary.get('seed', cfg.run.seed)}"
        if acc is not None
        else "not recorded (no summary.json)"
    )
    t = cfg.train
    steps = f", {summary['steps']:,} steps" if "steps" in summary else ""
    recipe = (
        f"{t.epochs} epochs{steps}, batch {t.batch_size}, {t.optimizer} at lr {t.lr}, {t.schedule}, {cfg.run.precision}"
    )
    data = summary.get("data") or {}
    if data.get("source") == "synthetic":
        data_line = "synthetic images (a smoke run)"
    elif data:
        kind = (
            "the official CIFAR-10 files"
            if data.get("official")
            else "a copy of CIFAR-10 that is not the official files"
        )
        data_line = f"{kind} (md5 of the files {data.get('md5', '?')})"
    else:
        data_line = "not recorded"
    return f"""---
library_name: cifar_dist
tags: [image-classification, cifar10]
pipeline_tag: image-classification
datasets: [cifar10]
metrics: [accuracy]
---

# {cfg.name}: {cfg.model.name} on CIFAR-10

A CIFAR-10 classifier trained with cifar_dist ({count_parameters(trained.model):,} parameters,
{trained.what}).

| | |
|---|---|
| test accuracy | {result} |
| recipe | {recipe} |
| data | {data_line} |
| hardware | {summary.get("world_size", 1)} x {summary.get("device", "?")} |
| trained | {summary.get("date", "?")}, cifar_dist at commit {summary.get("git_sha", "?")} |

The full recipe is `config.yaml` (`cifar-dist train --config config.yaml` trains it again);
`config.json` holds the same for `from_pretrained`.

## Use

```python
from cifar_dist.inference.hub import CifarClassifier

model = CifarClassifier.from_pretrained("path/or/hub-repo")  # pixels 0-255, N x 3 x 32 x 32 floats
logits = model(pixels)
```

or `cifar-dist predict FOLDER image.png`, `cifar-dist eval --checkpoint FOLDER`.
"""


def save_for_hub(trained: TrainedModel, run_dir: Path | None, out: Path) -> Path:
    """Write ``trained`` (from ``run_dir``, whose summary.json fills the card) to ``out``."""
    summary_file = run_dir / "summary.json" if run_dir else None
    summary = {}
    if summary_file and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        summary["date"] = time.strftime("%Y-%m-%d", time.gmtime(summary_file.stat().st_mtime))
    CifarClassifier.of_run(trained, summary).save_pretrained(out)
    return out
