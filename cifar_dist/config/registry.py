"""The names a config key accepts, each registered once: models, input pipelines, precisions.

A registry maps a name to what it stands for: a ``"package.module:name"`` that is imported only
when the name is used (so checking a config imports nothing heavy), an object, or plain facts.
Adding a built-in is one line here; a test or a plugin adds its own with ``register`` and the
name is then accepted by the validation, listed by the reference and used by the run.
"""

from __future__ import annotations

from cifar_dist.config.plugins import import_object


class Registry:
    def __init__(self, key: str, entries: dict):
        self.key = key
        self._entries = dict(entries)

    def register(self, name: str, entry) -> None:
        """Add ``name`` (a new one: registering a name twice is a programming error)."""
        if name in self._entries:
            raise ValueError(f"{self.key}: {name!r} is registered already")
        self._entries[name] = entry

    def unregister(self, name: str) -> None:
        del self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def entry(self, name: str):
        """What ``name`` stands for, as registered (a spec string stays a string)."""
        return self._entries[name]

    def get(self, name: str):
        """The object ``name`` stands for (a spec is imported now)."""
        entry = self._entries[name]
        return import_object(entry, self.key) if isinstance(entry, str) else entry


# model.name: factory(model_cfg, num_classes, norm) -> nn.Module (norm: a BatchNorm-like class)
MODELS = Registry(
    "model.name",
    {
        "seed_resnet": "cifar_dist.model.resnet:seed_resnet",
        "resnet9": "cifar_dist.model.resnet:resnet9",
        "resnet18": "cifar_dist.model.resnet:resnet18",
        "airbench94": "cifar_dist.model.airbench:airbench94",
    },
)
# data.loader: a class with from_config(cfg, train_set, shard, device) -> data.Loader
LOADERS = Registry(
    "data.loader",
    {
        "torch": "cifar_dist.data.loaders:TorchLoader",
        "ffcv": "cifar_dist.data.ffcv_loader:FfcvLoader",
        "gpu": "cifar_dist.data.loaders:GpuLoader",
    },
)
# run.precision (besides auto): the torch dtype of autocast (None: no autocast) and Accelerate's name
PRECISIONS = Registry(
    "run.precision",
    {
        "fp32": {"dtype": None, "accelerate": "no"},
        "bf16": {"dtype": "bfloat16", "accelerate": "bf16"},
        "fp16": {"dtype": "float16", "accelerate": "fp16"},
    },
)
