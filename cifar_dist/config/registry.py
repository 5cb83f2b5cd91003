"""The names a config key accepts: models, input pipelines, precisions. A name maps to plain facts or to
a ``"package.module:name"`` imported only when used; an entry added here is accepted, listed and used."""

from __future__ import annotations

from cifar_dist.config.plugins import import_object

# model.name: factory(model_cfg, num_classes, norm) -> nn.Module (norm: a BatchNorm-like class)
MODELS: dict = {
    "seed_resnet": "cifar_dist.model.resnet:seed_resnet",
    "resnet9": "cifar_dist.model.resnet:resnet9",
    "resnet18": "cifar_dist.model.resnet:resnet18",
    "airbench94": "cifar_dist.model.airbench:airbench94",
}
# data.loader: a class with from_config(cfg, train_set, shard, device) -> data.Loader
LOADERS: dict = {
    "torch": "cifar_dist.data.loaders:TorchLoader",
    "ffcv": "cifar_dist.data.ffcv_loader:FfcvLoader",
    "gpu": "cifar_dist.data.loaders:GpuLoader",
}
# run.precision (besides auto): the torch dtype of autocast (None: no autocast) and Accelerate's name
PRECISIONS: dict = {
    "fp32": {"dtype": None, "accelerate": "no"},
    "bf16": {"dtype": "bfloat16", "accelerate": "bf16"},
    "fp16": {"dtype": "float16", "accelerate": "fp16"},
}


def load(entry, key: str):
    """What an entry of MODELS or LOADERS stands for: a spec is imported now, an object is itself."""
    return import_object(entry, key) if isinstance(entry, str) else entry
