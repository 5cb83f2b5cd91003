"""`cifar-dist prepare`: get CIFAR-10 into place (download when the network allows) and check it."""

from __future__ import annotations

from pathlib import Path

from cifar_dist.data.cifar import FOLDER, TEST_FILES, TRAIN_FILES, check_md5, load_cifar10
from cifar_dist.errors import DataError


def _complete(root: Path) -> bool:
    return all((root / FOLDER / n).is_file() for n in TRAIN_FILES + TEST_FILES)


def prepare(root: Path, download: bool = True, quiet: bool = False) -> str | None:
    """Make sure ``root/cifar-10-batches-py`` is complete and readable; returns a report line
    (``quiet``: None when the files were already there and read well)."""
    root = Path(root).expanduser()
    was_complete = _complete(root)
    if not was_complete and download:
        try:
            import torchvision

            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as e:  # no network, proxy, disk: all end in the same instructions
            raise DataError(
                f"{root / FOLDER}: CIFAR-10 is missing and the download failed ({type(e).__name__}); "
                f"download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and unpack it "
                f"into {root}/ (it makes {FOLDER}/ with data_batch_1..5, test_batch, batches.meta)"
            ) from None
    if not _complete(root):
        raise DataError(f"{root / FOLDER}: incomplete; it needs data_batch_1..5 and test_batch")
    train = load_cifar10(root, train=True, verify=False)
    test = load_cifar10(root, train=False, verify=False)
    if quiet and was_complete:
        return None
    note = "md5 matches the official files"
    if mismatched := check_md5(root / FOLDER, TRAIN_FILES + TEST_FILES, warn=False):  # the report line says it
        note = f"md5 differs for {len(mismatched)} files: not the official files (a rebuilt or modified copy)"
    return f"{root / FOLDER}: {len(train):,} train + {len(test):,} test images, {note}"
