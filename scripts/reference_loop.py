"""A plain PyTorch training loop, nothing of cifar_dist in it: the yardstick measured beside a
timing, so that a slow day on a shared machine can be told from slow code.

    python scripts/reference_loop.py            # prints images/s of 40 steps
    python scripts/reference_loop.py --bf16     # the same under bf16 autocast

A small ResNet (16/32/64 channels, one BasicBlock per stage: the CPU demo's shape), batch 256
of random images, SGD, channels_last, fp32 unless --bf16; 5 warm-up steps are not timed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(y)) + self.short(x))


def net(widths=(16, 32, 64)):
    layers, cin = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()], widths[0]
    for i, w in enumerate(widths):
        layers.append(Block(cin, w, 1 if i == 0 else 2))
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = net().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(args.batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    for i in range(5 + args.steps):
        if i == 5:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - t0
    print(
        f"reference loop ({'bf16' if args.bf16 else 'fp32'}): {args.steps * args.batch / elapsed:.0f} images/s, "
        f"{elapsed:.2f} s for {args.steps} steps on {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
