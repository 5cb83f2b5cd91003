"""Writing the files a run leaves behind so that a failed write never leaves a torn or empty file.

Each file is written to a temporary name beside it, flushed to disk and renamed over the
target: a reader sees the old file or the new one, never a part. A failure (disk full,
read-only or missing folder, a file where a folder belongs) is one EnvironmentFault line
naming the file; the temporary file is removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cifar_dist.errors import EnvironmentFault


def write_bytes_atomic(path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise EnvironmentFault(f"{path}: cannot write: {e.strerror or e}") from None


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path, obj, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
