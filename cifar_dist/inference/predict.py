"""Classify image files with a trained model: each image is read, made 32x32, normalized as its
run normalized, and given the run's class probabilities (docs/api.md, docs/runs.md)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar_dist.config.schema import Config
from cifar_dist.data import CLASSES, normalize
from cifar_dist.inference.evaluate import tta_logits
from cifar_dist.storage.checkpoint import load_trained

SIZE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class TrainedModel:
    """A run's evaluated weights in eval mode, with the config that normalizes its inputs."""

    model: torch.nn.Module
    cfg: Config
    what: str  # which weights, in words

    @classmethod
    def load(cls, path, device: torch.device | str = "cpu", trust_code: bool = False) -> TrainedModel:
        """From a run directory, a checkpoint or a .safetensors file beside its run's config.yaml;
        the weights the run evaluated (its EMA under ``eval.use_ema``)."""
        return cls(*load_trained(path, device, trust_code, needed_by="predicting"))


def read_image(path: Path) -> torch.Tensor:
    """uint8 [3, 32, 32] of an image file (``square``); raises ValueError naming the file when it
    is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # a truncated file fails here, not later
            return square(img)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        reason = "not an image" if isinstance(e, UnidentifiedImageError) else f"unreadable image ({e})"
        raise ValueError(f"{path}: {reason}") from None


def square(img) -> torch.Tensor:
    """uint8 [3, 32, 32] of a PIL image: another size is cropped to its central square, which is
    resized with PIL's bicubic filter (antialiased); grey, palette and alpha images become RGB."""
    from PIL import Image

    rgb = img.convert("RGB")
    if rgb.size != (SIZE, SIZE):
        w, h = rgb.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def read_images(paths) -> tuple[list[Path], list[torch.Tensor], list[str]]:
    """The images of ``paths`` (files, or folders: their image files, sorted, not recursive) in
    command-line order: (the files read, their pixels, one line per path or file skipped)."""
    files, images, problems = [], [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{path}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif path.is_file():
            found = [path]
        else:
            found = []
            problems.append(f"{path}: not found")
        for file in found:
            try:
                images.append(read_image(file))
                files.append(file)
            except ValueError as e:
                problems.append(str(e))
    return files, images, problems


def as_batch(images) -> torch.Tensor:
    """uint8 [N, 3, 32, 32] from a uint8 tensor or array (N,3,32,32 or N,32,32,3, as CIFAR-10's
    arrays; one image without N), an image file, a PIL image, or a list of files and PIL images."""
    if isinstance(images, (str, Path)) or hasattr(images, "convert"):
        images = [images]
    if isinstance(images, (list, tuple)) and not images:
        return torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8)
    if isinstance(images, (list, tuple)) and any(isinstance(i, (str, Path)) or hasattr(i, "convert") for i in images):
        return torch.stack([read_image(Path(i)) if isinstance(i, (str, Path)) else square(i) for i in images])
    x = torch.as_tensor(np.asarray(images) if isinstance(images, (list, tuple)) else images)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.dtype != torch.uint8 or tuple(x.shape[1:]) not in ((3, SIZE, SIZE), (SIZE, SIZE, 3)):
        raise ValueError(f"images: uint8 N x 3 x 32 x 32 or N x 32 x 32 x 3 expected, not {x.dtype} {tuple(x.shape)}")
    return x if x.shape[1] == 3 else x.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def probabilities(trained: TrainedModel, images, tta: str = "none", batch_size: int = 256) -> torch.Tensor:
    """Class probabilities [N, 10] (fp32, on the CPU) of ``images`` (anything ``as_batch`` takes),
    with the run's normalization and memory layout, averaged over the views of ``tta``."""
    cfg, model = trained.cfg, trained.model
    device = next(model.parameters()).device
    x_all = as_batch(images)
    out = []
    for s in range(0, len(x_all), batch_size):
        x = normalize(x_all[s : s + batch_size].to(device), cfg.data.mean, cfg.data.std, cfg.run.channels_last)
        out.append(tta_logits(model, x, tta, cfg.run.channels_last).softmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, len(CLASSES))


def predict(model, images, *, tta: str = "none", device=None, trust_code: bool = False) -> torch.Tensor:
    """Class probabilities [N, 10] (fp32, CPU) of ``images`` (anything ``as_batch`` takes, made
    32x32 as `cifar-dist predict` does). ``model``: a run directory, checkpoint, weights file or
    shared-model folder (the weights the run evaluated, normalized as it was), or a TrainedModel."""
    if not isinstance(model, TrainedModel):
        model = TrainedModel.load(model, device or ("cuda" if torch.cuda.is_available() else "cpu"), trust_code)
    return probabilities(model, images, tta)


def top_k(probs: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
    """Per image, its ``k`` likeliest classes with their probabilities, likeliest first."""
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(CLASSES[i], float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), indices.tolist())]


def predict_files(trained: TrainedModel, paths, tta: str = "none", batch_size: int = 256, k: int = 3):
    """(per file read, (path, top-k)), one line per path or file skipped, and the seconds the
    model took over them."""
    files, images, problems = read_images(paths)
    started = time.perf_counter()
    probs = probabilities(trained, torch.stack(images) if images else [], tta, batch_size)
    return list(zip(files, top_k(probs, k))), problems, time.perf_counter() - started
