"""CIFAR-10 files: a safe reader for the torchvision layout, checks, and synthetic data. The
batch files are pickles; unpickling allows only the globals a CIFAR batch names, so a crafted
file's ``os.system`` is refused before it runs."""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar_dist.errors import DataError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
# The official download's checksums (as torchvision lists them).
MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
# Globals a CIFAR batch pickle may name (numpy's array reconstruction, old and new module paths).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
}


@dataclass
class ImageSet:
    """Images as uint8 [N, 3, 32, 32] (RGB planes) and labels as int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> ImageSet:
        return ImageSet(self.images[start:stop], self.labels[start:stop])


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"refused to load global {module}.{name}")


def safe_unpickle(path: Path) -> dict:
    """Unpickle a CIFAR batch file; anything but its usual contents is refused."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Refused as e:
        raise DataError(f"{path}: not a CIFAR batch ({e}); nothing in it was executed") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        MemoryError,
    ) as e:
        raise DataError(f"{path}: truncated or corrupt CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR batch (holds {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 [N, 3, 32, 32], int64 [N]), with shape and label checks."""
    d = safe_unpickle(path)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{path}: not a CIFAR batch (no 'data' array or 'labels')")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be uint8 N x 3072, got {data.dtype} {data.shape}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: expected {data.shape[0]} integer labels, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, cached per (path, size, modification time)."""
    st = Path(path).stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns, algorithm)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_md5(folder: Path, names, warn: bool = True) -> list[str]:
    """Names whose md5 differs from the official download's; warns once about them (``warn``)."""
    mismatched = [n for n in names if n in MD5 and file_digest(folder / n, "md5") != MD5[n]]
    if mismatched and warn:
        warnings.warn(
            f"{folder}: {', '.join(mismatched)} differ from the official CIFAR-10 "
            "checksums: a rebuilt or modified copy, so accuracies on it are not the official "
            "files' (summary.json records which data a result is on)",
            stacklevel=2,
        )
    return mismatched


def load_cifar10(root: Path, train: bool, verify: bool = True) -> ImageSet:
    """Read the training or test split from ``root/cifar-10-batches-py``."""
    root = Path(root)
    folder = root / FOLDER
    names = TRAIN_FILES if train else TEST_FILES
    if any(not (folder / n).is_file() for n in names):
        raise DataError(
            f"{folder}: CIFAR-10 not found; run `cifar-dist prepare --root {root}` "
            f"or put data_batch_1..5 and test_batch from cifar-10-python.tar.gz "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) in {folder}/"
        )
    parts = [read_batch(folder / n) for n in names]
    if verify:
        check_md5(folder, names)
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels))


def synthetic_cifar(n: int, split_seed: int, num_classes: int = 10) -> ImageSet:
    """Learnable CIFAR-shaped data: a smooth colour template per class (seed 0) plus noise;
    ``split_seed`` draws the labels and noise, so train and test differ."""
    templates = torch.rand(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    templates = torch.nn.functional.interpolate(templates, size=32, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(split_seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.rand(n, 3, 32, 32, generator=g)
    images = (0.4 * templates[labels] + 0.6 * noise) * 255
    return ImageSet(images.round().clamp(0, 255).to(torch.uint8), labels)
