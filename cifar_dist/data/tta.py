"""Test-time augmentation (``eval.tta``): the views of an evaluation batch and their weights
(the modes are in docs/configuration.md). Each view depends on its own image alone, so a
sample's averaged logits do not depend on its batch, rank or the process count."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

# Forward passes per image of each mode: what an evaluation with it costs.
VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}
SHIFT = 1  # pixels; airbench pads by 1 and takes the two diagonal one-pixel shifts


def tta_views(x: torch.Tensor, mode: str, channels_last: bool = False) -> Iterator[tuple[float, torch.Tensor]]:
    """(weight, view) pairs of the normalized batch ``x``, weights summing to 1; made one at a
    time so an evaluation holds one view's activations."""
    if mode not in VIEWS:
        raise ValueError(f"unknown test-time augmentation {mode!r}")
    if mode == "none":
        yield 1.0, x
        return
    weight = 0.5 if mode == "flip" else 0.25
    yield weight, x
    yield weight, x.flip(3)
    if mode == "flip":
        return
    h, w = x.shape[-2:]
    padded = F.pad(x, (SHIFT,) * 4, mode="reflect")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # The window at the top left shows the image moved down and right; at the bottom right, up and left.
    for window in (padded[..., :h, :w], padded[..., 2 * SHIFT :, 2 * SHIFT :]):
        shifted = window.contiguous(memory_format=memory_format)  # the model's layout, as normalize gives
        yield 0.125, shifted
        yield 0.125, shifted.flip(3)
