"""The paper's modified ResNet ("seed_resnet", 4,916,284 parameters), ResNet-9 and ResNet-18;
``build_model(cfg)``. ReLU and flatten are functional so the per-layer summary lists the
paper's torchsummary rows; every BatchNorm is a ``GroupBatchNorm2d``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifar_dist.config.plugins import import_object, is_spec
from cifar_dist.config.registry import MODELS, load
from cifar_dist.errors import ConfigError
from cifar_dist.model.batchnorm import GroupBatchNorm2d


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN (ReLU between and after); 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, bn):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem + stages of BasicBlocks (first stage stride 1, then 2) + pool + linear."""

    def __init__(self, widths, blocks, num_classes: int = 10, bn=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = bn(widths[0])
        self.num_stages, cin = len(widths), widths[0]
        for i, (width, depth) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(depth):
                layers.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1, bn))
                cin = width
            # layer1, layer2, ...: the paper's names, so its state dicts load as they are
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.linear(torch.flatten(self.avgpool(out), 1))


class ConvBN(nn.Module):
    """3x3 conv + BN + ReLU, optionally followed by 2x2 max pooling (ResNet-9's unit)."""

    def __init__(self, cin, cout, bn, pool=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn = bn(cout)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x):
        return self.pool(F.relu(self.bn(self.conv(x))))


class Residual(nn.Module):
    def __init__(self, *units):
        super().__init__()
        self.body = nn.Sequential(*units)

    def forward(self, x):
        return x + self.body(x)


class GlobalMaxPool(nn.Module):
    """``nn.AdaptiveMaxPool2d(1)`` via ``amax``, whose CUDA backward is deterministic."""

    def forward(self, x):
        return x.amax(dim=(2, 3), keepdim=True)


class ResNet9(nn.Module):
    """ResNet-9 of DAWNBench (Page) and FFCV's CIFAR example: 64-128-256-512, two residuals."""

    def __init__(self, num_classes: int = 10, bn=nn.BatchNorm2d):
        super().__init__()
        self.net = nn.Sequential(
            ConvBN(3, 64, bn),
            ConvBN(64, 128, bn, pool=True),
            Residual(ConvBN(128, 128, bn), ConvBN(128, 128, bn)),
            ConvBN(128, 256, bn, pool=True),
            ConvBN(256, 512, bn, pool=True),
            Residual(ConvBN(512, 512, bn), ConvBN(512, 512, bn)),
            GlobalMaxPool(),
            nn.Flatten(),
        )
        self.linear = nn.Linear(512, num_classes, bias=False)
        self.scale = 0.125  # Page's logit scaling

    def forward(self, x):
        return self.linear(self.net(x)) * self.scale


# The built-in factories (config.registry.MODELS names them): (model config, classes, norm) -> module


def seed_resnet(model_cfg, num_classes: int, norm) -> nn.Module:
    """The paper's modified ResNet: BasicBlock stages of ``model.blocks`` at ``model.widths``."""
    return ResNet(model_cfg.widths, model_cfg.blocks, num_classes, norm)


def resnet18(model_cfg, num_classes: int, norm) -> nn.Module:
    return ResNet([64, 128, 256, 512], [2, 2, 2, 2], num_classes, norm)


def resnet9(model_cfg, num_classes: int, norm) -> nn.Module:
    return ResNet9(num_classes, norm)


def build_model(model_cfg, num_classes: int = 10, norm=None) -> nn.Module:
    """The model named by ``model.name`` (or a ``"package.module:function"`` factory called as
    ``function(model_cfg, num_classes)``), with group BatchNorm unless ``norm`` is given."""

    def bn(c):
        return GroupBatchNorm2d(c, group=model_cfg.bn_group, momentum=model_cfg.bn_momentum)

    if model_cfg.name in MODELS:
        return load(MODELS[model_cfg.name], "model.name")(model_cfg, num_classes, norm or bn)
    if not is_spec(model_cfg.name):
        raise ConfigError(
            f"model.name: must be one of {', '.join(MODELS)} or package.module:factory, got {model_cfg.name!r}"
        )
    factory = import_object(model_cfg.name, "model.name")
    if not callable(factory):
        raise ConfigError(f"model.name: {model_cfg.name!r} is not callable")
    try:
        model = factory(model_cfg, num_classes)
    except Exception as e:
        raise ConfigError(
            f"model.name: {model_cfg.name}(model_cfg, {num_classes}) failed: {type(e).__name__}: {e}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name: {model_cfg.name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
