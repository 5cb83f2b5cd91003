"""Test-time augmentation (``eval.tta``): the views of an evaluation batch and their weights.

    none             1 view:  the image
    flip             2 views: the image and its mirror (left-right), 1/2 each
    flip_translate   6 views, airbench's TTA level 2: the image and its mirror, 1/4 each;
                     the image shifted by one pixel down and right, and by one pixel up
                     and left, each with its mirror, 1/8 each

A shift pads the image by one pixel on every side by reflection (torch's ``reflect``: the
pixel past an edge repeats the one next to the edge, so no black border enters the view)
and crops the 32x32 window one pixel off the centre. The weights are airbench's: half on
the image and its mirror, half on the four shifted views.

Each view is a pure function of its own image, so a sample's averaged logits do not depend
on the batch it is in, its rank or the number of processes. The cost is one forward pass
per view.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

# Forward passes per image of each mode: what an evaluation with it costs.
VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}
SHIFT = 1  # pixels; airbench pads by 1 and takes the two diagonal one-pixel shifts


def tta_views(x: torch.Tensor, mode: str, channels_last: bool = False) -> Iterator[tuple[float, torch.Tensor]]:
    """(weight, view) of each view of the normalized batch ``x`` [B,C,H,W]; the weights sum
    to 1. Views are made one at a time: an evaluation holds one view's activations."""
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
