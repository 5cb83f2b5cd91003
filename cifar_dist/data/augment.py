"""The augmentation every loader shares, on uint8 [B, 3, 32, 32] batches. Every random decision
is a counter-based hash of (seed, epoch, global sample index, stream), the same on any device
and for any rank or worker (docs/data.md)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay inside int64

# Independent random streams, one per decision.
CROP_Y, CROP_X, FLIP, CUT_Y, CUT_X, BRIGHT, CONTRAST, SATUR, HUE, JITTER_ORDER, ROTATE, ORDER = range(12)


def _mix32(x):
    """A 32-bit integer finalizer on Python ints or int64 tensors holding values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _MUL & _M32
    x = ((x >> 16) ^ x) * _MUL & _M32
    return (x >> 16) ^ x


def hash_u32(seed: int, epoch: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform 32-bit integers (as int64) keyed by (seed, epoch, index, stream)."""
    key = _mix32((seed & _M32) ^ 0x9E3779B9)  # on Python ints, exactly as on tensors
    if seed >> 32:  # seeds past 32 bits (up to 2^63 - 1) differ in their data too; smaller ones are unchanged
        key = _mix32(key ^ _mix32((seed >> 32) & _M32))
    key = _mix32(key ^ (epoch & _M32))
    key = _mix32(key ^ (stream * 0x85EBCA6B & _M32))
    return _mix32((index.to(torch.int64) & _M32) ^ key)


def rand_int(seed, epoch, index, stream, n: int) -> torch.Tensor:
    """Integers in [0, n), exact on every device: (h * n) >> 32."""
    return (hash_u32(seed, epoch, index, stream) * n) >> 32


def rand_uniform(seed, epoch, index, stream, lo: float, hi: float) -> torch.Tensor:
    u = hash_u32(seed, epoch, index, stream).to(torch.float64) / 2.0**32
    return (lo + (hi - lo) * u).to(torch.float32)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The global visiting order of ``n`` samples in ``epoch``: a seeded permutation."""
    g = torch.Generator().manual_seed(int(hash_u32(seed, epoch, torch.tensor([0]), ORDER)[0]))
    return torch.randperm(n, generator=g)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """What to apply, read from the data config; the same for every loader."""

    crop_padding: int = 0
    flip: str = "none"  # none | random | alternating
    cutout: int = 0
    color_jitter: float = 0.0
    rotation: float = 0.0
    fill: tuple = (125, 123, 114)  # cutout fill: the mean pixel, 0 after normalization
    crop_pad_mode: str = "zeros"  # zeros | reflect

    @classmethod
    def from_config(cls, data_cfg) -> AugmentSpec:
        """Each field from the data config's key of its name; ``fill`` from its mean."""
        keys = [f.name for f in dataclasses.fields(cls) if f.name != "fill"]
        fill = tuple(int(round(m * 255)) for m in data_cfg.mean)
        return cls(fill=fill, **{k: getattr(data_cfg, k) for k in keys})

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip != "none" or self.cutout or self.color_jitter or self.rotation)


def augment(x: torch.Tensor, index: torch.Tensor, epoch: int, seed: int, spec: AugmentSpec) -> torch.Tensor:
    """Augment a uint8 batch; sample ``i`` is transformed by its global ``index[i]`` alone."""
    if not spec.active:
        return x
    if index.device != x.device:  # ffcv's host indices on a GPU batch; the gpu loader's are there already
        index = index.to(x.device, non_blocking=True)
    if spec.crop_padding:
        x = random_crop(x, index, epoch, seed, spec.crop_padding, spec.crop_pad_mode == "reflect")
    if spec.flip != "none":
        x = torch.where(flips(index, epoch, seed, spec.flip).view(-1, 1, 1, 1), x.flip(3), x)
    if spec.color_jitter:
        x = color_jitter(x, index, epoch, seed, spec.color_jitter)
    if spec.rotation:
        x = rotate(x, index, epoch, seed, spec.rotation)
    if spec.cutout:
        x = cutout(x, index, epoch, seed, spec.cutout, spec.fill)
    return x


def flips(index, epoch: int, seed: int, mode: str) -> torch.Tensor:
    """Which samples are mirrored in ``epoch``; alternating inverts each one's epoch-0 coin in odd epochs."""
    if mode == "alternating":
        return rand_int(seed, 0, index, FLIP, 2).bool() ^ bool(epoch % 2)
    return rand_int(seed, epoch, index, FLIP, 2).bool()


def random_crop(x, index, epoch, seed, pad: int, reflect: bool = False):
    """torchvision's RandomCrop(32, padding=pad), zero or mirrored padding, by pure indexing."""
    b, c, h, w = x.shape
    dy = rand_int(seed, epoch, index, CROP_Y, 2 * pad + 1)
    dx = rand_int(seed, epoch, index, CROP_X, 2 * pad + 1)
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    if reflect:  # padded coordinate p is image coordinate p - pad, mirrored back inside [0, n)
        return x[bi, ci, _reflect(rows - pad, h), _reflect(cols - pad, w)]
    return F.pad(x, (pad, pad, pad, pad))[bi, ci, rows, cols]


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Coordinates mirrored at the border without repeating the edge (torch's 'reflect' padding)."""
    return (n - 1) - ((n - 1) - i.abs()).abs()


def cutout(x, index, epoch, seed, size: int, fill):
    """DeVries & Taylor's cutout: a size x size square centred anywhere, clipped at the border."""
    b, c, h, w = x.shape
    cy = rand_int(seed, epoch, index, CUT_Y, h).view(b, 1, 1)
    cx = rand_int(seed, epoch, index, CUT_X, w).view(b, 1, 1)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    lo = size // 2
    inside = (ys >= cy - lo) & (ys < cy - lo + size) & (xs >= cx - lo) & (xs < cx - lo + size)
    return torch.where(inside.unsqueeze(1), device_constant(fill, x.dtype, x.device).view(1, c, 1, 1), x)


@functools.lru_cache(maxsize=16)
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A constant copied to ``device`` once, not at every step."""
    return torch.tensor(values, dtype=dtype, device=device)


def _gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a, b, ratio):
    return (ratio * a + (1 - ratio) * b).clamp(0, 1)


def _shift_hue(x, shift):
    """Rotate the hue of RGB images in [0, 1] by ``shift`` turns (per sample)."""
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    delta = maxc - x.amin(1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hr = ((g - b) / safe) % 6
    hg = (b - r) / safe + 2
    hb = (r - g) / safe + 4
    hue = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb)) / 6
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    # HSV -> RGB with the standard piecewise-linear formula
    k = torch.stack([(5 + hue * 6) % 6, (3 + hue * 6) % 6, (1 + hue * 6) % 6], 1)
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return maxc.unsqueeze(1) - (maxc * sat).unsqueeze(1) * f


def color_jitter(x, index, epoch, seed, s: float):
    """torchvision's ColorJitter(s, s, s, s): four adjustments in a random order per sample."""
    b = x.shape[0]
    xf = x.float() / 255
    # ``index`` is on x's device (augment puts it there), and so is every draw from it
    factors = [rand_uniform(seed, epoch, index, st, 1 - s, 1 + s).view(b, 1, 1, 1) for st in (BRIGHT, CONTRAST, SATUR)]
    hue = rand_uniform(seed, epoch, index, HUE, -s, s)
    ops = [
        lambda t: _blend(t, torch.zeros_like(t), factors[0]),
        lambda t: _blend(t, _gray(t).mean((1, 2, 3), keepdim=True), factors[1]),
        lambda t: _blend(t, _gray(t), factors[2]),
        lambda t: _shift_hue(t, hue),
    ]
    # Each sample's order is one of the 24 permutations of the four operations.
    perm_id = rand_int(seed, epoch, index, JITTER_ORDER, 24)
    order = device_constant(_PERMS, torch.int64, x.device)[perm_id]  # [B, 4]
    for step in range(4):
        for op_id, op in enumerate(ops):
            mask = (order[:, step] == op_id).view(b, 1, 1, 1)
            xf = torch.where(mask, op(xf), xf)
    return (xf * 255).round().clamp(0, 255).to(torch.uint8)


_PERMS = tuple(itertools.permutations(range(4)))  # the 24 orders of the four jitter operations


def rotate(x, index, epoch, seed, degrees: float):
    """torchvision's RandomRotation(degrees): about the centre, nearest neighbour, zero fill."""
    angle = rand_uniform(seed, epoch, index, ROTATE, -degrees, degrees) * (math.pi / 180)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([cos, -sin, zero, sin, cos, zero], 1).view(-1, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)
