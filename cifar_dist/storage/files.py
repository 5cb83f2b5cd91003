"""Atomic file writes (temporary file, fsync, rename), a failure being one EnvironmentFault line
naming the file; nothing is written through a symbolic link in a folder the user named, since a
received run directory could point one anywhere (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from cifar_dist.errors import EnvironmentFault, UserError

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def no_link(path) -> Path:
    """``path``, refused in one line (exit 2) when it is a symbolic link."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{path}: a symbolic link; cifar-dist writes nothing through links (remove it)")
    return path


def utf8_path(path) -> Path:
    """``path``, refused in one line (exit 2) unless valid UTF-8, so every later step can name it."""
    path = Path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise UserError(f"{shown}: the path is not valid UTF-8; choose a folder whose name is") from None
    return path


def no_missing_folder(path, option: str) -> Path:
    """An output file a user named (``option``): its folder must exist and it must not be a folder."""
    path = utf8_path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a directory; name a file")
    if not path.parent.is_dir():
        raise UserError(f"{option} {path}: folder {path.parent} does not exist")
    return path


def own_folder(path) -> Path:
    """A folder cifar-dist writes into inside the user's: made when missing, refused if a link."""
    path = no_link(path)
    try:
        path.mkdir(exist_ok=True)
    except OSError as e:
        raise EnvironmentFault(f"{path}: cannot make the folder: {e.strerror or e}") from None
    return path


def create_new(path):
    """``path`` opened ("wb") as a new file after removing a link or file of that name."""
    path = Path(path)
    if path.is_symlink() or path.exists():
        path.unlink()
    return os.fdopen(os.open(path, _NEW, 0o644), "wb")


@contextlib.contextmanager
def replacing(path, failure: str = "cannot write"):
    """A temporary path beside ``path`` that replaces it when the block ends; an OSError leaves
    nothing behind and is one EnvironmentFault line naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise EnvironmentFault(f"{path}: {failure}: {e.strerror or e}") from None


def write_bytes_atomic(path, data: bytes) -> None:
    with replacing(path) as tmp, create_new(tmp) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path, obj, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
