"""Checkpoints: atomic ``checkpoints/step_N/`` directories with a manifest of digests, the
newest intact one wins, safe loading (layout and guarantees: docs/runs.md, reliability.md)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cifar_dist.config.loading import load_config
from cifar_dist.config.plugins import require_trust
from cifar_dist.errors import CheckpointError, say
from cifar_dist.model.resnet import build_model
from cifar_dist.storage.files import own_folder, replacing, utf8_path
from cifar_dist.storage.state import TrainState, parse_state

_NAME = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
EMA_FILE = "ema.safetensors"  # a checkpoint's EMA of the weights (train.ema; trainer.averaging writes it)


def _fsync(path: Path) -> None:
    """Flush a file or a folder (a rename in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_step_dir(path: Path) -> bool:
    return bool(_NAME.match(path.name)) and path.parent.name == "checkpoints"


def write_tensors(tensors: dict, path: Path) -> None:
    """A dict of tensors as a safetensors file of contiguous CPU copies (a failed write: OSError)."""
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as e:  # disk full, file too large
        raise OSError(str(e).replace("Error while serializing: ", "")) from None


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write ``model.safetensors`` atomically (temporary file, fsync, rename)."""
    with replacing(path, "cannot write weights") as tmp:
        tmp.unlink(missing_ok=True)  # safetensors would write through a link of that name
        write_tensors(model.state_dict(), tmp)
        _fsync(tmp)


def load_weights(path: str | os.PathLike, model: torch.nn.Module | None = None) -> dict:
    """Read a safetensors file; with ``model``, load it strictly and name any mismatch."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if model is not None:
        check_compatible(state, model.state_dict(), path)
        model.load_state_dict(state, strict=True)
    return state


def check_compatible(state: dict, expected: dict, source) -> None:
    """``state`` has exactly the keys and shapes of ``expected``, else a CheckpointError."""
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(
            f"{source}: weights do not fit this model ({what}; {len(missing)} missing, {len(extra)} unexpected keys)"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(state[k].shape)}, this model needs {tuple(v.shape)}")


def _remove(path: Path) -> None:
    """A checkpoint folder deleted; a link in its place is removed, never followed."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_model(path, device="cpu", trust_code: bool = False):
    """A trained model in eval mode from a run directory, a checkpoint directory or a
    ``.safetensors`` file; user code named by its config runs only with ``trust_code``."""
    return load_trained(path, device, trust_code)[0]


def load_trained(path, device="cpu", trust_code: bool = False, needed_by: str = "load_model"):
    """(the model the run evaluated, in eval mode; the run's config; which weights, in words)."""
    weights, config, what = locate_weights(Path(path))
    if not config.is_file():
        raise CheckpointError(f"{config}: missing; {needed_by} needs the run's config.yaml")
    cfg = load_config(config)
    require_trust(cfg.model.name, config, trust_code)
    weights, what = evaluated_weights(weights, what, cfg, named=Path(path).is_file())
    model = build_model(cfg.model)
    load_weights(weights, model)
    return model.to(device).eval(), cfg, what


def locate_weights(path) -> tuple[Path, Path, str]:
    """(weights file, the run's config.yaml, what they are in words) for a run directory (final
    weights, else the newest checkpoint), a checkpoint directory or a ``.safetensors`` file."""
    path = Path(path)
    utf8_path(path.absolute())
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors weights file, a run directory or a checkpoint")
        # a checkpoint's weights: RUN/checkpoints/step_N/model.safetensors
        run = path.parent.parent.parent if _is_step_dir(path.parent) else path.parent
        return path, run / "config.yaml", f"weights {path.name}"
    if _is_step_dir(path):
        if not (path / "model.safetensors").is_file():
            raise CheckpointError(
                f"{path}: no model.safetensors in this checkpoint (a DeepSpeed checkpoint holds "
                "its weights in DeepSpeed's own files; evaluate the run's final weights)"
            )
        if problem := check_checkpoint(path):
            raise CheckpointError(f"damaged checkpoint: {problem}")
        return path / "model.safetensors", path.parent.parent / "config.yaml", f"checkpoint {path.name}"
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors", path / "config.yaml", "final weights"
    ckpt = latest_checkpoint(path)  # the newest intact one; damaged ones are named and skipped
    if ckpt is not None and (ckpt / "model.safetensors").is_file():
        what = f"newest checkpoint {ckpt.name} (the run has no final weights yet)"
        return ckpt / "model.safetensors", path / "config.yaml", what
    raise CheckpointError(f"{path}: no model.safetensors and no checkpoint (is it a run directory?)")


def evaluated_weights(weights: Path, what: str, cfg, named: bool, use_ema: bool | None = None) -> tuple[Path, str]:
    """(weights, description) to evaluate: with ``use_ema`` None those the run evaluated (a checkpoint's
    EMA under ``eval.use_ema``), else the EMA or training weights wherever the run keeps them (docs/runs.md)."""
    if use_ema is None:
        ema = weights.parent / EMA_FILE
        if cfg.eval.use_ema and not named and ema.is_file():
            return ema, f"{what}: its EMA weights (eval.use_ema)"
        return weights, what
    if named:
        raise CheckpointError(
            f"{weights}: eval.use_ema chooses between a run's weights; a named weights file is evaluated "
            "as it is (name its run or checkpoint, or drop eval.use_ema)"
        )
    kind = "EMA" if use_ema else "training"
    folder = weights.parent
    if what == "final weights":
        if bool(cfg.eval.use_ema) == use_ema:  # its final model.safetensors holds what it evaluated
            return weights, f"final weights ({kind})"
        ckpt = latest_checkpoint(folder)
        if ckpt is None:
            raise CheckpointError(
                f"{folder}: no {kind} weights: its final model.safetensors holds the "
                f"{'EMA' if cfg.eval.use_ema else 'training'} weights and no checkpoint is left"
            )
        folder, what = ckpt, f"newest checkpoint {ckpt.name}"
    chosen = folder / (EMA_FILE if use_ema else "model.safetensors")
    if not chosen.is_file():
        raise CheckpointError(f"{folder}: no {kind} weights ({chosen.name}; the run trained without train.ema)")
    return chosen, f"{what.split(' (')[0]}: its {kind} weights (eval.use_ema={str(use_ema).lower()})"


def read_state(ckpt: Path) -> TrainState:
    """The checkpoint's state.json, validated (types, ranges, known keys)."""
    path = Path(ckpt) / "state.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({str(e)[:120]})") from None
    return parse_state(data, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """``manifest.json``: the size and SHA-256 of every file in ``folder`` (written last)."""
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": entries}, indent=1))


def check_checkpoint(ckpt: Path) -> str | None:
    """None for an intact checkpoint, else what is wrong, naming the file; one without a
    manifest (an earlier format) is checked by its state alone."""
    ckpt = Path(ckpt)
    manifest = ckpt / MANIFEST
    if manifest.exists():
        try:
            entries = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            entries = None
        if not (isinstance(entries, dict) and all(isinstance(e, dict) for e in entries.values())):
            return f"{manifest}: unreadable manifest"
        present = {str(p.relative_to(ckpt)) for p in _files(ckpt)}
        for name in sorted(set(entries) | present):
            path, entry = ckpt / name, entries.get(name)
            if entry is None:
                return f"{path}: not in the manifest"
            if name not in present:
                return f"{path}: missing"
            if path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
                return f"{path}: differs from the manifest (size or SHA-256)"
    try:
        read_state(ckpt)
    except CheckpointError as e:
        return str(e)
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint, skipping damaged ones with a warning; None when there are
    none, a CheckpointError when none is intact."""
    found = list_checkpoints(run_dir)
    for ckpt in reversed(found):
        problem = check_checkpoint(ckpt)
        if problem is None:
            if not (ckpt / MANIFEST).exists():
                say(
                    f"cifar-dist: warning: {ckpt}: no manifest (an earlier checkpoint format): its files "
                    "cannot be verified"
                )
            return ckpt
        say(f"cifar-dist: warning: skipping damaged checkpoint {ckpt.name}: {problem}")
    if found:
        raise CheckpointError(
            f"{Path(run_dir) / 'checkpoints'}: none of its {len(found)} checkpoints is intact "
            "(see the warnings above); nothing was changed"
        )
    return None


class CheckpointWriter:
    """Writes step_XXXXXXXX directories atomically and keeps the newest ``keep``."""

    def __init__(self, run_dir: Path, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for the checkpoint of ``step`` (rank 0 calls this)."""
        own_folder(self.root)
        tmp = self.root / f".tmp-step_{step:08d}"
        _remove(tmp)  # a write cut short, or a link of that name
        tmp.mkdir()
        return tmp

    @staticmethod
    def write_state(tmp: Path, state: dict) -> None:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))

    def commit(self, tmp: Path, step: int) -> Path:
        """Write ``tmp``'s manifest, rename it into place as ``step``'s checkpoint, prune old ones."""
        write_manifest(tmp)
        for f in [*_files(tmp), tmp / MANIFEST]:
            _fsync(f)
        final = self.root / f"step_{step:08d}"
        old = self.root / f".old-{final.name}-{time.time_ns()}"
        if final.exists() or final.is_symlink():  # the same step saved again (e.g. after a resume)
            os.rename(final, old)
        os.rename(tmp, final)
        _remove(old)
        _fsync(self.root)
        for stale in list_checkpoints(self.root.parent)[: -self.keep]:
            _remove(stale)
        return final

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)


def load_optimizer_state(path: Path) -> dict:
    """``optimizer.pt`` with ``weights_only=True``: a pickle code payload is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "refused"
        raise CheckpointError(f"{path}: refused to load ({first[:160]}); nothing in it was executed") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable optimizer state ({e})") from None
