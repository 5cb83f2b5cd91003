"""The paper's colour jitter and rotation (configs/seed.yaml: ColorJitter(0.1, 0.1, 0.1, 0.1) and
RandomRotation(10)) against torchvision's functional ops at the same per-image factors.

cifar_dist.data.augment implements the four jitter operations and the rotation itself, on whole
batches, drawing every factor per image from keyed hashes (rand_uniform / rand_int). Each operation
is applied here at known factors, given explicitly to the package's helpers or drawn from the keyed
streams and read back, and compared image by image with torchvision.transforms.v2.functional:
on [0, 1] float32 images to ATOL (float rounding only), and on the uint8 pipeline exactly, except
where the float reference lies within float rounding of a uint8 rounding boundary.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from cifar_dist.config.loading import load_config
from cifar_dist.data import augment
from cifar_dist.data.augment import (
    BRIGHT,
    CONTRAST,
    HUE,
    JITTER_ORDER,
    ROTATE,
    SATUR,
    AugmentSpec,
    rand_int,
    rand_uniform,
)

from conftest import REPO

SEED, EPOCH = 42, 3
INDEX = torch.arange(1000, 1064)  # global sample indices: the keys of every draw
ATOL = 1e-5  # float32 rounding on [0, 1] images
SEED_SPEC = AugmentSpec.from_config(load_config(REPO / "configs" / "seed.yaml").data)
PAPER_JITTER, PAPER_ROTATION = SEED_SPEC.color_jitter, SEED_SPEC.rotation  # 0.1 and 10 degrees
# The paper's recipe with every augmentation off; each test switches on the one it checks.
NONE = dataclasses.replace(SEED_SPEC, crop_padding=0, flip="none", cutout=0, color_jitter=0.0, rotation=0.0)
TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)  # ColorJitter's fn_idx 0..3


def _images(n: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _floats(n: int = 16) -> torch.Tensor:
    return _images(n).float() / 255


def _ours(op: str, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """One operation exactly as color_jitter's list of ops applies it, at explicit per-image factors."""
    f = factors.view(-1, 1, 1, 1)
    if op == "brightness":
        return augment._blend(x, torch.zeros_like(x), f)
    if op == "contrast":
        return augment._blend(x, augment._gray(x).mean((1, 2, 3), keepdim=True), f)
    if op == "saturation":
        return augment._blend(x, augment._gray(x), f)
    return augment._shift_hue(x, factors)


def _torchvision(op: str, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    fn = TV_OPS[("brightness", "contrast", "saturation", "hue").index(op)]
    return torch.stack([fn(img, float(f)) for img, f in zip(x, factors)])


def _assert_op_matches(op: str, factors: torch.Tensor) -> None:
    x = _floats(len(factors))
    diff = (_ours(op, x, factors) - _torchvision(op, x, factors)).abs().max().item()
    assert diff <= ATOL, f"{op}: max |ours - torchvision| = {diff:.3g}"


def _assert_rounds_to(out: torch.Tensor, ref: torch.Tensor) -> None:
    """``out`` (uint8) is ``ref`` (floats in [0, 255]) rounded, except where ``ref`` is within float
    rounding of a .5 boundary, and there by one level at most."""
    expected = ref.round().clamp(0, 255).to(torch.uint8)
    near_tie = (ref - ref.floor() - 0.5).abs() < 255 * ATOL
    differs = out != expected
    assert not (differs & ~near_tie).any(), f"{int((differs & ~near_tie).sum())} pixels differ away from a tie"
    assert (out.int() - expected.int()).abs().max() <= 1


# Factors across each op's whole valid range (ColorJitter(s) for any s <= 1), one per image.
FACTORS = torch.linspace(0.0, 2.0, 16)
HUE_SHIFTS = torch.linspace(-0.5, 0.5, 16)


def test_brightness_matches_torchvision_adjust_brightness():
    """x * factor, clamped to [0, 1]."""
    _assert_op_matches("brightness", FACTORS)


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_the_jitter_is_torchvisions_on_pil_images_the_papers_path_within_one_level(op):
    """The paper's notebook jitters PIL images (ColorJitter before ToTensor): torchvision then runs
    PIL's ImageEnhance, whose grayscale weighs red 0.299 as augment._gray does (its tensor ops use
    0.2989). Ours, rounded to 8 bits, is within one level of PIL's, which works in 8 bits and
    truncates, at the paper's factors (0.9-1.1) and over the whole range."""
    import torchvision.transforms.functional as F1

    fn = {"brightness": F1.adjust_brightness, "contrast": F1.adjust_contrast, "saturation": F1.adjust_saturation}[op]
    x8 = _images()
    for factors in (torch.linspace(0.9, 1.1, 16), FACTORS):
        ours = (_ours(op, x8.float() / 255, factors) * 255).round().int()
        pil = torch.stack([F1.pil_to_tensor(fn(F1.to_pil_image(img), float(f))) for img, f in zip(x8, factors)])
        assert (ours - pil.int()).abs().max() <= 1


def test_hue_matches_torchvision_adjust_hue():
    """Hue rotated in HSV by the shift (in turns), saturation and value kept."""
    _assert_op_matches("hue", HUE_SHIFTS)


def test_contrast_and_saturation_differ_from_torchvision_only_in_the_grayscale_weights(monkeypatch):
    """With torchvision's tensor grayscale (red 0.2989) put in place of augment._gray (0.299, PIL's
    and so the paper's), both match its tensor ops to float rounding: the luma's red weight is the
    whole difference from that path."""
    monkeypatch.setattr(augment, "_gray", lambda t: TF.rgb_to_grayscale(t))
    _assert_op_matches("contrast", FACTORS)
    _assert_op_matches("saturation", FACTORS)


@pytest.mark.parametrize("strength", [PAPER_JITTER, 0.5])
def test_jitter_applies_the_four_ops_in_each_images_keyed_order(monkeypatch, strength):
    """Our order, per image: brightness, contrast and saturation factors uniform in [1 - s, 1 + s]
    (streams BRIGHT, CONTRAST, SATUR), a hue shift uniform in [-s, s] (HUE), and one of the 24
    orders, k = rand_int(..., JITTER_ORDER, 24) indexing itertools.permutations(range(4)); step j
    applies op permutations[k][j], numbered as torchvision's ColorJitter numbers them (0 brightness,
    1 contrast, 2 saturation, 3 hue; it applies torch.randperm(4) first to last). Unlike torchvision,
    which draws one order per call, every image has its own. The ops run on floats in [0, 1], rounded
    to uint8 once at the end (torchvision on a uint8 tensor or PIL image quantizes after each op).

    The reference applies torchvision's ops to each image in that order at the drawn factors.
    torchvision's grayscale stands in for augment._gray, so that only draws and order are checked
    here (the grayscale weights are tested above). The order matters even at the paper's s = 0.1:
    the same factors in reverse order change every image."""
    monkeypatch.setattr(augment, "_gray", lambda t: TF.rgb_to_grayscale(t))
    x = _images(len(INDEX))
    out = augment.augment(x, INDEX, EPOCH, SEED, dataclasses.replace(NONE, color_jitter=strength))
    factors = [rand_uniform(SEED, EPOCH, INDEX, st, 1 - strength, 1 + strength) for st in (BRIGHT, CONTRAST, SATUR)]
    factors.append(rand_uniform(SEED, EPOCH, INDEX, HUE, -strength, strength))
    orders = [list(itertools.permutations(range(4)))[k] for k in rand_int(SEED, EPOCH, INDEX, JITTER_ORDER, 24)]
    assert len(set(orders)) >= 20  # drawn per image, not once per batch

    def reference(order_of):
        images = []
        for i, img in enumerate(x.float() / 255):
            for op_id in order_of(i):
                img = TV_OPS[op_id](img, float(factors[op_id][i]))
            images.append(img)
        return torch.stack(images) * 255

    _assert_rounds_to(out, reference(lambda i: orders[i]))
    reversed_order = reference(lambda i: orders[i][::-1]).round().to(torch.uint8)
    assert (reversed_order != out).flatten(1).any(1).all()


@pytest.mark.parametrize("degrees", [PAPER_ROTATION, 180.0])
def test_rotation_matches_torchvision_rotate_at_the_drawn_angle(degrees):
    """Angle uniform in [-degrees, degrees] per image (stream ROTATE), positive counter-clockwise as in
    torchvision; about the image centre, nearest neighbour, zero fill, same size (RandomRotation's
    defaults). The uint8 result equals torchvision.transforms.v2.functional.rotate pixel for pixel."""
    x = _images(len(INDEX))
    out = augment.augment(x, INDEX, EPOCH, SEED, dataclasses.replace(NONE, rotation=degrees))
    angles = rand_uniform(SEED, EPOCH, INDEX, ROTATE, -degrees, degrees)
    assert angles.min() < 0 < angles.max()

    def reference(sign):
        return torch.stack(
            [
                TF.rotate(img, sign * float(a), interpolation=InterpolationMode.NEAREST, expand=False, fill=0)
                for img, a in zip(x, angles)
            ]
        )

    assert torch.equal(out, reference(1))
    moved = (out != x).flatten(1).any(1)  # below about 1.8 degrees nearest neighbour leaves 32 x 32 images as they are
    assert moved.float().mean() > 0.7
    # The opposite sign gives another image (where +a and -a are not near the same turn, about 180 degrees).
    apart = angles.abs() < 90
    assert torch.equal((reference(-1) != out).flatten(1).any(1)[apart], moved[apart])
