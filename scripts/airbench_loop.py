"""The airbench94 recipe in a plain PyTorch loop, nothing of cifar_dist in it: the yardstick that
``configs/airbench94.yaml`` is timed beside (docs/reproducing.md).

    python scripts/airbench_loop.py --data DIR                # the whole recipe: 9.9 epochs, TTA
    python scripts/airbench_loop.py --data DIR --steps 20     # images/s of 20 steps (after 3 untimed)

DIR holds cifar-10-batches-py/. The recipe is the one the config trains (Keller Jordan's
airbench94, arXiv 2404.00498): the 2x2 patch-whitening layer, three conv groups at 64/256/256,
SGD with Nesterov momentum at batch 1024, BatchNorm biases at 64x the learning rate, label
smoothing 0.2, alternating flip and translate-by-2 with reflect padding, Lookahead with a
cubic ramp, flip-and-translate test-time augmentation. fp32 unless --bf16 (CPU autocast); eager unless --compile.
"""

from __future__ import annotations

import argparse
import math
import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def load(folder: Path, train: bool):
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for name in names:
        with open(folder / "cifar-10-batches-py" / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys += list(d[b"labels"])
    x = torch.from_numpy(np.concatenate(xs)).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last), torch.tensor(ys)


def conv(cin, cout, k=3, padding="same", bias=False):
    c = nn.Conv2d(cin, cout, k, padding=padding, bias=bias)
    if bias:
        c.bias.data.zero_()
    nn.init.dirac_(c.weight.data[: c.weight.size(1)])
    return c


def bn(c):
    b = nn.BatchNorm2d(c, eps=1e-12, momentum=0.4)
    b.weight.requires_grad_(False)
    return b


def group(cin, cout):
    return nn.Sequential(conv(cin, cout), nn.MaxPool2d(2), bn(cout), nn.GELU(), conv(cout, cout), bn(cout), nn.GELU())


class Scale(nn.Module):
    def forward(self, x):
        return x / 9


def make_net():
    net = nn.Sequential(
        conv(3, 24, 2, padding=0, bias=True),
        nn.GELU(),
        group(24, 64),
        group(64, 256),
        group(256, 256),
        nn.MaxPool2d(3),
        nn.Flatten(),
        nn.Linear(256, 10, bias=False),
        Scale(),
    )
    net[0].weight.requires_grad_(False)
    return net.to(memory_format=torch.channels_last)


@torch.no_grad()
def init_whitening(layer, images, eps=5e-4):
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12).double()
    values, vectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    values, vectors = values.flip(0), vectors.T.flip(0)
    scaled = (vectors / torch.sqrt(values + eps).view(-1, 1)).reshape(12, 3, 2, 2)
    layer.weight.copy_(torch.cat([scaled, -scaled]).float())


def tta_logits(net, x):
    def mirror(t):
        return 0.5 * net(t) + 0.5 * net(t.flip(-1))

    padded = F.pad(x, (1, 1, 1, 1), "reflect")
    shifted = 0.5 * mirror(padded[:, :, 0:32, 0:32]) + 0.5 * mirror(padded[:, :, 2:34, 2:34])
    return 0.5 * mirror(x) + 0.5 * shifted


@torch.no_grad()
def evaluate(net, x, y, tta: bool, autocast) -> float:
    net.eval()
    correct = 0
    for s in range(0, len(x), 1000):
        with autocast():
            logits = tta_logits(net, x[s : s + 1000]) if tta else net(x[s : s + 1000])
        correct += int((logits.argmax(1) == y[s : s + 1000]).sum())
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder holding cifar-10-batches-py/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="time this many steps only (0: the whole recipe)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only on CPUs with bf16 units)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (the first steps compile)")
    args = ap.parse_args()

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    torch.manual_seed(args.seed)
    x_train, y_train = load(args.data, True)
    x_test, y_test = load(args.data, False)
    batch, epochs, momentum = 1024, 9.9, 0.85
    steps_per_epoch = len(x_train) // batch
    total = math.ceil(epochs * steps_per_epoch)
    lr, wd = 11.5 / 1024 / (1 + 1 / (1 - momentum)), 0.0153 / (1 + 1 / (1 - momentum))
    net = make_net()
    init_whitening(net[0], x_train[:5000])
    forward = torch.compile(net) if args.compile else net
    norm_biases = [
        p for n, p in net.named_parameters() if p.requires_grad and isinstance(_owner(net, n), nn.BatchNorm2d)
    ]
    ids = {id(p) for p in norm_biases}
    others = [p for p in net.parameters() if p.requires_grad and id(p) not in ids]
    # the loss is a sum over the batch, as airbench's: lr and decay are per summed image
    opt = torch.optim.SGD(
        [
            {"params": norm_biases, "lr": lr * 64, "weight_decay": wd / (lr * 64), "scale": 64},
            {"params": others, "lr": lr, "weight_decay": wd / lr, "scale": 1},
        ],
        momentum=momentum,
        nesterov=True,
    )
    warm = int(total * 0.23)

    def factor(step):
        if step < warm:
            return 0.2 + 0.8 * step / warm
        return 1.0 - 0.93 * (step - warm) / (total - warm)

    slow = {k: v.clone() for k, v in net.state_dict().items()}
    padded_set = F.pad(x_train, (2, 2, 2, 2), "reflect")
    first_flip = torch.rand(len(x_train)) < 0.5
    step, t0, timed_from = 0, time.perf_counter(), None
    for epoch in range(math.ceil(epochs)):
        net[0].bias.requires_grad_(epoch < 3)
        net.train()
        shifts = torch.randint(0, 5, (len(x_train), 2))
        flip = first_flip ^ bool(epoch % 2)
        order = torch.randperm(len(x_train))
        for i in range(steps_per_epoch):
            if args.steps and step == 3:
                timed_from = time.perf_counter()
            idx = order[i * batch : (i + 1) * batch]
            rows = (shifts[idx, 0].view(-1, 1) + torch.arange(32)).view(-1, 1, 32, 1)
            cols = (shifts[idx, 1].view(-1, 1) + torch.arange(32)).view(-1, 1, 1, 32)
            xb = padded_set[idx.view(-1, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), rows, cols]
            xb = torch.where(flip[idx].view(-1, 1, 1, 1), xb.flip(-1), xb).contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr * g["scale"] * factor(step)
            with autocast():
                loss = F.cross_entropy(forward(xb), y_train[idx], label_smoothing=0.2, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 5 == 0 or step == total:
                decay = 0.95**5 * (step / total) ** 3 if step % 5 == 0 else 1.0
                with torch.no_grad():
                    for k, v in net.state_dict().items():
                        if v.is_floating_point():
                            slow[k].lerp_(v, 1 - decay)
                            v.copy_(slow[k])
            if args.steps and step == 3 + args.steps:
                elapsed = time.perf_counter() - timed_from
                print(f"airbench loop: {args.steps * batch / elapsed:.0f} images/s, {elapsed / args.steps:.3f} s/step")
                return
            if step == total:
                break
    train_s = time.perf_counter() - t0
    plain, tta = evaluate(net, x_test, y_test, False, autocast), evaluate(net, x_test, y_test, True, autocast)
    print(
        f"airbench loop: seed {args.seed}: {100 * tta:.2f}% with TTA, {100 * plain:.2f}% without; "
        f"{train_s:.0f} s of training"
    )


def _owner(net: nn.Module, param_name: str) -> nn.Module:
    return net.get_submodule(param_name.rpartition(".")[0])


if __name__ == "__main__":
    main()
