"""``cifar-dist prepare --from-archive``: the ``cifar-10-batches-py`` layout from a JPEG copy
(docs/data.md). Image k is the next unused image of class ``train_labels[k]``, so labels and
order match the official files; the pixels do not."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from cifar_dist.data.cifar import CLASSES, FOLDER, TEST_FILES, TRAIN_FILES
from cifar_dist.errors import DataError

PER_BATCH = 10_000


def _members(archive: Path) -> dict[str, bytes]:
    """Every regular file of the archive by its path below the top folder."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            out = {}
            for m in tar:
                f = tar.extractfile(m) if m.isfile() else None
                if f is not None:
                    name = m.name.split("/", 1)[1] if "/" in m.name else m.name
                    out[name] = f.read()
            return out
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:  # missing, a folder, cut short, damaged
        raise DataError(f"{archive}: cannot read the archive: {str(e) or type(e).__name__}") from None


def _labels(members: dict, name: str, archive: Path) -> list[int]:
    if name not in members:
        raise DataError(f"{archive}: no {name}; expected a CIFAR-10 JPEG archive")
    try:
        labels = [int(v) for v in members[name].split()]
    except ValueError:
        raise DataError(f"{archive}: {name}: expected whole-number labels") from None
    if any(not 0 <= v < len(CLASSES) for v in labels):
        raise DataError(f"{archive}: {name}: labels must be 0..9")
    return labels


def _images(members: dict, split: str, labels: list[int], archive: Path) -> np.ndarray:
    """[N, 3072] uint8 rows (R, G, B planes), the k-th of class c for its k-th label c."""
    from PIL import Image

    rows = np.empty((len(labels), 3 * 32 * 32), np.uint8)
    taken = [0] * len(CLASSES)
    for i, c in enumerate(labels):
        path = f"{split}/{CLASSES[c]}/{taken[c]:04d}.jpg"
        if path not in members:
            raise DataError(f"{archive}: {path} missing (the labels name more images than the archive holds)")
        try:
            image = np.asarray(Image.open(io.BytesIO(members[path])).convert("RGB"), np.uint8)
        except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for a damaged image
            raise DataError(f"{archive}: {path}: not a readable image ({type(e).__name__})") from None
        if image.shape != (32, 32, 3):
            raise DataError(f"{archive}: {path}: expected 32 x 32 pixels, got {image.shape[1]} x {image.shape[0]}")
        rows[i] = image.transpose(2, 0, 1).reshape(-1)
        taken[c] += 1
    return rows


def _write(path: Path, batch: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    os.replace(tmp, path)


def unpack_jpeg_archive(archive: Path, root: Path) -> bool:
    """Write ``root/cifar-10-batches-py`` from ``archive``; False when it was complete already."""
    archive, out = Path(archive), Path(root).expanduser() / FOLDER
    if all((out / n).is_file() for n in TRAIN_FILES + TEST_FILES):
        return False
    members = _members(archive)
    out.mkdir(parents=True, exist_ok=True)
    for split, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        labels = _labels(members, f"{split}_labels.txt", archive)
        if len(labels) != PER_BATCH * len(files):
            raise DataError(
                f"{archive}: {split}_labels.txt: expected {PER_BATCH * len(files)} labels, got {len(labels)}"
            )
        rows = _images(members, split, labels, archive)
        for b, name in enumerate(files):
            part = slice(b * PER_BATCH, (b + 1) * PER_BATCH)
            label = f"{split} batch {b + 1} of {len(files)}".encode()
            _write(out / name, {b"batch_label": label, b"labels": labels[part], b"data": rows[part]})
    _write(
        out / "batches.meta",
        {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072},
    )
    return True
