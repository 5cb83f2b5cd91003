"""FFCV .beton files of CIFAR-10 (raw pixels, label, sample index): written once, verified
against ``manifest.json`` before use, since FFCV reading a damaged file can crash or hang."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from cifar_dist.data.cifar import ImageSet, file_digest, load_cifar10
from cifar_dist.errors import ConfigError, DataError

MANIFEST = "manifest.json"
FFCV_HELP = (
    "pip install 'cifar_dist[ffcv]' (FFCV builds from source and needs Debian's "
    "pkg-config libturbojpeg0-dev libopencv-dev: sudo apt-get install pkg-config "
    "libturbojpeg0-dev libopencv-dev)"
)


def require_ffcv():
    """Import FFCV, or say how to install it; restores the torch thread count its import resets."""
    threads = torch.get_num_threads()
    try:
        import ffcv.loader  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"data.loader: ffcv is not installed ({e.name or e}); {FFCV_HELP}") from None
    finally:
        torch.set_num_threads(threads)


def fingerprint(data: ImageSet) -> str:
    """sha256 of the images and labels: which data a .beton holds."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.images.numpy()).tobytes())
    h.update(data.labels.numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: unreadable manifest ({e}); delete it and the .beton files to rewrite them") from None


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / f".tmp-{MANIFEST}-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(folder / MANIFEST)


class _Samples:
    """What FFCV's writer iterates: (HWC uint8 image, label, global index)."""

    def __init__(self, data: ImageSet):
        self.images = data.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = data.labels.numpy()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), i


def _write(data: ImageSet, path: Path, workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    writer = DatasetWriter(
        str(tmp),
        {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()},
        num_workers=max(workers, 1),
    )
    writer.from_indexed_dataset(_Samples(data), chunksize=1000)
    tmp.replace(path)


def ensure_beton(data: ImageSet, folder: Path, name: str, workers: int = 2) -> tuple[Path, bool]:
    """The verified .beton of ``data``; written (returns True) when missing or stale."""
    require_ffcv()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.beton"
    manifest = _read_manifest(folder)
    fp = fingerprint(data)
    entry = manifest.get(name)
    if path.is_file() and entry and entry.get("fingerprint") == fp:
        verify(path, entry)
        return path, False
    if path.is_file() and entry is None:
        raise DataError(f"{path}: not listed in {folder / MANIFEST}; delete it to have it rewritten")
    _write(data, path, workers)
    manifest[name] = {
        "count": len(data),
        "fingerprint": fp,
        "bytes": path.stat().st_size,
        "sha256": file_digest(path, "sha256"),
    }
    _write_manifest(folder, manifest)
    return path, True


def verify(path: Path, entry: dict) -> None:
    """Size and checksum against the manifest: a damaged file is refused before FFCV opens it."""
    size = path.stat().st_size
    rewrite = "delete it and rerun `cifar-dist prepare --beton`"
    if size != entry.get("bytes"):
        raise DataError(
            f"{path}: truncated or damaged .beton ({size} bytes, the manifest says {entry.get('bytes')}); {rewrite}"
        )
    if file_digest(path, "sha256") != entry.get("sha256"):
        raise DataError(f"{path}: corrupt .beton (sha256 differs from the manifest); {rewrite}")


def write_betons(root: Path, folder: Path | None = None) -> str:
    """`cifar-dist prepare --beton`: train.beton and test.beton of the CIFAR-10 in ``root``."""
    folder = Path(folder) if folder else Path(root) / "beton"
    lines = []
    for split, train in (("train", True), ("test", False)):
        data = load_cifar10(Path(root), train=train, verify=False)
        path, written = ensure_beton(data, folder, split)
        lines.append(f"{path}: {len(data):,} images, {'written' if written else 'up to date'}")
    return "\n".join(lines)
