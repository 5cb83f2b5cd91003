"""cifar_dist: reproducible CIFAR-10 training from one device to a Slurm cluster.

What users import comes from here (docs/api.md), loaded when first used, so that
``import cifar_dist`` imports nothing heavy and changes nothing.
"""

from __future__ import annotations

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "train": "cifar_dist.train",  # the module, callable: cifar_dist.train(config, overrides, out)
    "predict": "cifar_dist.inference.predict",
    "TrainedModel": "cifar_dist.inference.predict",
    "CifarClassifier": "cifar_dist.inference.hub",
    "load_model": "cifar_dist.storage.checkpoint",
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
__all__ = (
    "train",
    "predict",
    "TrainedModel",
    "CifarClassifier",
    "load_model",
    "Callback",
    "build_model",
    "count_parameters",
    "GroupBatchNorm2d",
    "load_config",
    "Config",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "RunConfig",
    "CheckpointConfig",
    "EvalConfig",
)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        module = importlib.import_module(_PUBLIC[name])
        return module if name == "train" else getattr(module, name)
    raise AttributeError(f"module 'cifar_dist' has no attribute {name!r}")
