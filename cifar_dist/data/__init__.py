"""Data: CIFAR-10 files, the shared augmentation, sharding, and the three loaders."""

from __future__ import annotations

from cifar_dist.config.loading import resolve_data_root, train_images  # noqa: F401 (data.train_images)
from cifar_dist.config.registry import LOADERS, load
from cifar_dist.config.schema import Config
from cifar_dist.data.cifar import CLASSES, FOLDER, MD5, ImageSet, check_md5, file_digest, load_cifar10, synthetic_cifar
from cifar_dist.data.loaders import Loader, eval_batches, normalize
from cifar_dist.data.sharding import Shard
from cifar_dist.distributed.launcher import env_rank
from cifar_dist.errors import ConfigError

__all__ = [
    "CLASSES",
    "ImageSet",
    "Loader",
    "Shard",
    "build_datasets",
    "build_train_loader",
    "data_identity",
    "eval_batches",
    "normalize",
]


def build_datasets(cfg: Config) -> tuple[ImageSet, ImageSet, str]:
    """(training set, evaluation set, evaluation set's name: 'test' or 'val')."""
    d = cfg.data
    if d.synthetic:
        train, test = synthetic_cifar(d.synthetic_train, 1), synthetic_cifar(d.synthetic_test, 2)
    else:
        root = resolve_data_root(cfg)
        train, test = load_cifar10(root, train=True, verify=False), load_cifar10(root, train=False, verify=False)
        if env_rank() == 0:  # one warning, from one process, for a copy that is not the official one
            check_md5(root / FOLDER, list(MD5))
    name = "test"
    if d.val_split:  # config.loading.validate checked the sizes
        n = len(train) - d.val_split
        train, test, name = train.slice(0, n), train.slice(n, len(train)), "val"
    if d.subset:
        train = train.slice(0, d.subset)
    return train, test, name


def data_identity(cfg: Config) -> dict:
    """Which data a result came from (summary.json): the files' folder, a checksum of
    their contents, and whether they are the official CIFAR-10 files; or synthetic data."""
    import hashlib

    d = cfg.data
    if d.synthetic:
        return {"source": "synthetic", "train": d.synthetic_train, "test": d.synthetic_test}
    folder = resolve_data_root(cfg) / FOLDER
    digests = {n: file_digest(folder / n, "md5") for n in MD5}
    combined = hashlib.md5("".join(digests[n] for n in sorted(digests)).encode()).hexdigest()
    return {
        "source": str(folder),
        "md5": combined,
        "official": digests == MD5,
        "val_split": d.val_split,
        "subset": d.subset,
    }


def build_train_loader(cfg: Config, train: ImageSet, shard: Shard, device) -> Loader:
    """The input pipeline ``data.loader`` names (``config.registry.LOADERS``) over ``train``."""
    if cfg.data.loader not in LOADERS:
        raise ConfigError(f"data.loader: unknown loader {cfg.data.loader!r}")
    return load(LOADERS[cfg.data.loader], "data.loader").from_config(cfg, train, shard, device)
