"""cifar_dist: reproducible CIFAR-10 training from one device to a Slurm cluster."""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load_model(path, device="cpu", trust_code: bool = False):
    """A trained model ready for inference, from a run directory (its final weights, else its
    newest checkpoint), a checkpoint directory or a ``model.safetensors`` file.

    The architecture comes from the run's ``config.yaml``; the weights are read through
    safetensors (no code can run from the file). A config whose ``model.name`` names user
    code (``package.module:factory``) is refused unless ``trust_code=True``: a run directory
    received from elsewhere must not become a way to run code.
    """
    from cifar_dist.checkpoint import load_weights, locate_weights
    from cifar_dist.config import load_config
    from cifar_dist.errors import CheckpointError
    from cifar_dist.models import build_model
    from cifar_dist.plugins import require_trust

    weights, config, _ = locate_weights(Path(path))
    if not config.is_file():
        raise CheckpointError(f"{config}: missing; load_model needs the run's config.yaml")
    cfg = load_config(config)
    require_trust(cfg.model.name, config, trust_code)
    model = build_model(cfg.model)
    load_weights(weights, model)
    return model.to(device).eval()
