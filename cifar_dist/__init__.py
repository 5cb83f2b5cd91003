"""cifar_dist: reproducible CIFAR-10 training from one device to a Slurm cluster."""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """A trained model ready for inference, from a run directory or its ``model.safetensors``.

    The architecture comes from the run's ``config.yaml`` next to the weights;
    the weights are read through safetensors (no code can run from the file).
    """
    from cifar_dist.checkpoint import load_weights
    from cifar_dist.config import load_config
    from cifar_dist.errors import CheckpointError
    from cifar_dist.models import build_model

    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    config = weights.parent / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{config}: missing; load_model needs the run's config.yaml next to the weights")
    cfg = load_config(config)
    model = build_model(cfg.model)
    load_weights(weights, model)
    return model.to(device).eval()
