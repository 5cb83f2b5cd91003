"""cifar_dist: reproducible CIFAR-10 training from one device to a Slurm cluster.

What users import comes from here: ``load_model``, ``build_model``, ``Callback`` (the base of
``run.callbacks``) and the config types a model factory receives (``ModelConfig``, ...). They
are loaded when first used, so ``import cifar_dist`` imports nothing heavy and changes nothing.
"""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "Callback": "cifar_dist.trainer.callbacks",
    "build_model": "cifar_dist.model.resnet",
    "count_parameters": "cifar_dist.model.resnet",
    "GroupBatchNorm2d": "cifar_dist.model.batchnorm",
    "load_config": "cifar_dist.config.loading",
    "Config": "cifar_dist.config.schema",
    "DataConfig": "cifar_dist.config.schema",
    "ModelConfig": "cifar_dist.config.schema",
    "TrainConfig": "cifar_dist.config.schema",
    "RunConfig": "cifar_dist.config.schema",
    "CheckpointConfig": "cifar_dist.config.schema",
    "EvalConfig": "cifar_dist.config.schema",
}
__all__ = ("load_model", "Callback", "build_model", "count_parameters", "GroupBatchNorm2d", "load_config", "Config",
           "DataConfig", "ModelConfig", "TrainConfig", "RunConfig", "CheckpointConfig", "EvalConfig")


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'cifar_dist' has no attribute {name!r}")


def load_model(path, device="cpu", trust_code: bool = False):
    """A trained model ready for inference, from a run directory (its final weights, else its
    newest checkpoint), a checkpoint directory or a ``model.safetensors`` file.

    The architecture comes from the run's ``config.yaml``; the weights are read through
    safetensors (no code can run from the file). A config whose ``model.name`` names user
    code (``package.module:factory``) is refused unless ``trust_code=True``: a run directory
    received from elsewhere must not become a way to run code.
    """
    from cifar_dist.config.loading import load_config
    from cifar_dist.config.plugins import require_trust
    from cifar_dist.errors import CheckpointError
    from cifar_dist.model.resnet import build_model
    from cifar_dist.storage.checkpoint import load_weights, locate_weights

    weights, config, _ = locate_weights(Path(path))
    if not config.is_file():
        raise CheckpointError(f"{config}: missing; load_model needs the run's config.yaml")
    cfg = load_config(config)
    require_trust(cfg.model.name, config, trust_code)
    model = build_model(cfg.model)
    load_weights(weights, model)
    return model.to(device).eval()
