"""The baseline every benchmark row is compared with: the obvious PyTorch loop, as in the paper's
notebook (torchvision-style DataLoader with its transforms on PIL images and 2 workers, or synthetic
normalized images; fp32, eager, NCHW, nn.BatchNorm2d; the same model and batch size)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cifar_dist.bench.timing import Clock, figures, peak_memory, time_steps
from cifar_dist.model.resnet import build_model


class _PilCifar(Dataset):
    def __init__(self, data, transform):
        self.images, self.labels, self.transform = data.images, data.labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
        return self.transform(img), int(self.labels[i])


def _loader(cfg, batch, data):
    if data is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(max(batch * 4, 512), 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (len(x),), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True), "synthetic"
    import torchvision.transforms as T

    normalize = T.Normalize(cfg.data.mean, cfg.data.std)
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    loader = DataLoader(_PilCifar(data, tf), batch_size=batch, shuffle=True, num_workers=2, drop_last=True)
    return loader, "torchvision w2"


def _repeat(loader):
    while True:
        yield from loader


def measure(cfg, batch: int, args, device, data=None) -> dict:
    """Images/s of the plain loop at ``batch`` (one process), timed like every row."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, norm=nn.BatchNorm2d).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loader, kind = _loader(cfg, batch, data)
    stream = _repeat(loader)

    def step(batch_):
        inputs, targets = batch_[0].to(device), batch_[1].to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets, label_smoothing=cfg.train.label_smoothing)
        loss.backward()
        optimizer.step()

    model.train()
    timing = time_steps(step, lambda: next(stream), Clock(device), args.warmup, args.steps, args.repeats)
    fig = figures(timing, args.steps, batch, 1, peak_memory(device))
    fig["loader"] = kind
    return fig
