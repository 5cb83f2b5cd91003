"""airbench94's network (arXiv 2404.00498: 94.01% mean over 1,000 runs with its recipe,
``configs/airbench94.yaml``); the layers are listed in docs/reproducing.md. 1,971,352 trained
parameters, plus 288 frozen whitening weights and 1,152 BatchNorm weights frozen at 1."""

from __future__ import annotations

import torch
import torch.nn as nn

WHITEN_PATCH = 2  # the whitening layer's kernel size
WHITEN_EPS = 5e-4  # added to each eigenvalue before its inverse square root
WHITEN_IMAGES = 5000  # the first training images whose patches are whitened (airbench's choice)
WIDTHS = (64, 256, 256)
LOGIT_SCALE = 1 / 9


def _identity_init(conv: nn.Conv2d) -> nn.Conv2d:
    """Default init, then output channel i passes input channel i through (for i < inputs)."""
    w = conv.weight.data
    nn.init.dirac_(w[: w.size(1)])
    return conv


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, norm):
        super().__init__()
        self.conv1 = _identity_init(nn.Conv2d(cin, cout, 3, padding="same", bias=False))
        self.pool = nn.MaxPool2d(2)
        self.norm1 = norm(cout)
        self.conv2 = _identity_init(nn.Conv2d(cout, cout, 3, padding="same", bias=False))
        self.norm2 = norm(cout)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    def __init__(self, num_classes: int = 10, norm=nn.BatchNorm2d, whiten_bias_epochs: int = 3):
        super().__init__()

        def scale_free_norm(c: int) -> nn.Module:
            bn = norm(c)
            bn.eps = 1e-12
            bn.weight.requires_grad_(False)
            return bn

        width = 2 * 3 * WHITEN_PATCH**2
        self.whiten = nn.Conv2d(3, width, WHITEN_PATCH, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        assert self.whiten.bias is not None
        self.whiten.bias.data.zero_()
        self.activ = nn.GELU()
        self.group1 = ConvGroup(width, WIDTHS[0], scale_free_norm)
        self.group2 = ConvGroup(WIDTHS[0], WIDTHS[1], scale_free_norm)
        self.group3 = ConvGroup(WIDTHS[1], WIDTHS[2], scale_free_norm)
        self.pool = nn.MaxPool2d(3)
        self.linear = nn.Linear(WIDTHS[2], num_classes, bias=False)
        self.whiten_bias_epochs = whiten_bias_epochs
        self.init_images = WHITEN_IMAGES  # how many training images init_from_data is given

    def forward(self, x):
        x = self.activ(self.whiten(x))
        x = self.group3(self.group2(self.group1(x)))
        return self.linear(torch.flatten(self.pool(x), 1)) * LOGIT_SCALE

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the whitening weights from the first ``init_images`` normalized training images;
        float64 on the CPU, so every process and device gets the same bits."""
        self.whiten.weight.copy_(whitening_weights(images).to(self.whiten.weight))

    def frozen_parameters(self, epoch: int) -> list[torch.Tensor]:
        """Parameters with no step in ``epoch``: the whitening bias after ``whiten_bias_epochs``."""
        bias = self.whiten.bias
        return [bias] if bias is not None and epoch >= self.whiten_bias_epochs else []


def whitening_weights(images: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """[24, 3, 2, 2] filters: eigenvectors of the uncentred 2x2-patch covariance, largest first,
    each divided by sqrt(eigenvalue + eps), then the same negated."""
    x = images.detach().to("cpu", torch.float64)
    c, k = x.shape[1], WHITEN_PATCH
    patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
    covariance = patches.T @ patches / len(patches)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    values, vectors = values.flip(0), vectors.T.flip(0)  # rows: eigenvectors, largest first
    scaled = (vectors / torch.sqrt(values + eps).unsqueeze(1)).reshape(c * k * k, c, k, k)
    return torch.cat([scaled, -scaled])


def airbench94(model_cfg, num_classes: int, norm) -> nn.Module:
    """The registry's factory (``model.name: airbench94``)."""
    return AirbenchNet(num_classes, norm, model_cfg.whiten_bias_epochs)
