"""The run directory: choose it, refuse to clobber it (unless ``--overwrite``), lock it against a second
run, and check a resume."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

import yaml

from cifar_dist.config.loading import read_yaml
from cifar_dist.config.overrides import override_text
from cifar_dist.config.schema import Config, flatten_keys, result_free_keys, result_keys_in
from cifar_dist.errors import RunDirError
from cifar_dist.storage.checkpoint import latest_checkpoint, list_checkpoints
from cifar_dist.storage.files import no_link, utf8_path, write_text_atomic
from cifar_dist.storage.metrics import read_metrics

# Keys a resume may change: the result-free ones, the step cap and the final evaluation's TTA.
RESUMABLE_CHANGES = result_free_keys() | {"train.max_steps", "eval.tta"}
_ABSENT = "(absent)"
# The folders a run writes into inside its directory: a link in their place is refused.
RUN_FOLDERS = ("checkpoints", "plots", "profile", "tensorboard", "trackers", "mlflow", "wandb")
# The files it writes there: a folder in their place is refused at the start, not after training.
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "model.safetensors",
    "confusion_matrix.json",
    "trackers.json",
)


def lock_holder(run_dir: Path) -> str | None:
    """The pid holding ``run_dir``'s lock (a run training there now), else None."""
    lock = Path(run_dir) / ".lock"
    if not lock.is_file() or lock.is_symlink():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 64).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)
    return None


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def config_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) of every differing key that would change a resumed run's
    result: ``eval.tta`` under ``eval.tta_every_epoch``, result-free keys under ``RESULT_WHEN``."""
    a, b = flatten_keys(saved), flatten_keys(current)
    fixed = ({"eval.tta"} if a.get("eval.tta_every_epoch") else set()) | result_keys_in(a) | result_keys_in(b)
    return [
        (k, a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(set(a) | set(b))
        if (k not in RESUMABLE_CHANGES or k in fixed)
        and _result_part(k, a.get(k, _ABSENT)) != _result_part(k, b.get(k, _ABSENT))
    ]


def _result_part(key: str, value):
    """What of ``value`` changes the result: a group's sub-keys that do."""
    if isinstance(value, dict):
        return {sub: v for sub, v in value.items() if f"{key}.{sub}" not in RESUMABLE_CHANGES}
    return value


def _short(value) -> str:
    text = value if value is _ABSENT else override_text(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RunDir:
    """Decides how a run uses its directory (rank 0 only) and holds its lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self.created = False  # this run made the directory (or found it empty)

    def has_content(self) -> bool:
        return self.path.is_dir() and any(p.name != ".lock" for p in self.path.iterdir())

    def open(self, config: dict, resume: bool, overwrite: bool):
        """Create or reuse the directory; return the checkpoint to resume from (or None). A refusal
        leaves the directory as it was, bar its lock file."""
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite exclude each other")
        utf8_path(self.path.absolute())
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: exists and is not a directory; choose another --out")
        self.created = not self.has_content()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot create the run directory ({e.strerror or e})") from None
        self._lock()
        try:
            for folder in RUN_FOLDERS:  # refused now, not after training
                no_link(self.path / folder)
            for name in RUN_FILES:
                if (self.path / name).is_dir():
                    raise RunDirError(f"{self.path / name}: a folder where the run writes a file; remove it")
            return self._use(config, resume, overwrite)
        except BaseException:
            self._unlock()
            raise

    def _use(self, config: dict, resume: bool, overwrite: bool):
        if not self.has_content():
            return None
        if overwrite:
            if not (self.path / "config.yaml").is_file():
                raise RunDirError(
                    f"{self.path}: not a run directory (no config.yaml) and not empty; --overwrite "
                    "only replaces run directories"
                )
            for p in self.path.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            return None
        if not resume:
            raise RunDirError(
                f"{self.path}: run directory exists; pass --resume to continue it or --overwrite to replace it"
            )
        self._check_same_config(config)
        ckpt = latest_checkpoint(self.path)  # a CheckpointError when none of them is intact
        if ckpt is None:
            if (self.path / "summary.json").exists():
                raise RunDirError(
                    f"{self.path}: a finished run with no usable checkpoint: --resume has nothing to continue, "
                    "and starting again would replace its results; pass --overwrite to train it again"
                )
            if rows := read_metrics(self.path, warn=False):
                raise RunDirError(
                    f"{self.path}: {len(rows)} epoch(s) in metrics.jsonl but no usable checkpoint: "
                    "--resume would start again and replace them; pass --overwrite to train it again"
                )
        return ckpt

    def _check_same_config(self, config: dict) -> None:
        saved_path = self.path / "config.yaml"
        if not saved_path.is_file():
            return
        changed = config_changes(read_yaml(saved_path), config)
        if changed:
            shown = "; ".join(f"{k}: saved {_short(old)}, now {_short(new)}" for k, old, new in changed[:4])
            more = f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise RunDirError(
                f"{saved_path}: cannot resume with a different config ({shown}{more}); "
                f"`--out {self.path} --resume` alone continues with the saved config"
            )

    def discard_unstarted(self) -> bool:
        """Remove the directory this process created if no checkpoint or summary reached it, so the
        same ``--out`` works again; returns whether it did."""
        if not self.created or list_checkpoints(self.path) or (self.path / "summary.json").exists():
            return False
        self._unlock()
        shutil.rmtree(self.path, ignore_errors=True)
        return not self.path.exists()

    def _lock(self) -> None:
        lock = self.path / ".lock"
        try:
            if lock.is_symlink():  # never opened through a link: a new file of our own replaces it
                lock.unlink()
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot write in the run directory ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"{self.path}: run directory is in use by pid {holder}; wait for it or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    close = _unlock


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
