"""A plain training loop in one file, readable top to bottom: the specification the framework extends.

Data, augmentation and the model come from cifar_dist's own modules, so its run is comparable with
`cifar-dist train`; the loop (learning rate per step, forward, label-smoothed loss, backward,
optimizer step, evaluation) is written out here, for one process on one device. With
train.exact_reduce=false it ends with the framework's single-process weights, bit for bit
(tests/test_minimal_example.py).

    python examples/minimal_train.py --config configs/seed.yaml                  # the paper's recipe
    python examples/minimal_train.py --config configs/smoke.yaml train.exact_reduce=false train.epochs=4

Left out, and refused when a config asks for it: gradient accumulation, parameter groups, EMA,
Lookahead, fp16 loss scaling, test-time augmentation. Also left out: several processes,
checkpoints and resume, metrics files, plots.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from cifar_dist.config.loading import load_config
from cifar_dist.data import build_datasets
from cifar_dist.data.augment import AugmentSpec, augment, epoch_order
from cifar_dist.model.batchnorm import sync_bn_statistics
from cifar_dist.model.resnet import build_model


def lr_at(step: int, t, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` (from 0): a pure function of the step."""
    if t.schedule_unit == "epoch":  # the paper's LambdaLR, stepped once per epoch
        pos, warm, total = step // steps_per_epoch, t.warmup_epochs, t.epochs
    else:
        pos, warm, total = step, t.warmup_epochs * steps_per_epoch, math.ceil(t.epochs * steps_per_epoch - 1e-9)
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "warmup_cosine":  # linear warm-up, then cosine to 0
        if pos < warm:
            return t.lr * pos / warm
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * (pos - warm) / max(total - warm, 1e-12)))
    if t.schedule == "onecycle":  # linear rise from lr x start, then linear fall to lr x end
        start, end = t.lr_start_factor, t.lr_end_factor
        if pos < warm:
            return t.lr * (start + (1.0 - start) * pos / warm)
        return t.lr * (1.0 - (1.0 - end) * min(1.0, (pos - warm) / max(total - warm, 1e-12)))
    return t.lr * t.gamma ** sum(step // steps_per_epoch >= m for m in t.milestones)  # "step"


def smoothed_loss(logits, y, eps: float, form: str, reduction: str = "mean"):
    """Label-smoothed cross entropy in fp32: ``paper`` puts eps/(K-1) on each wrong class, ``torch`` eps/K on all."""
    logits = logits.float()
    if form == "torch" or eps == 0:
        return F.cross_entropy(logits, y, label_smoothing=eps, reduction=reduction)
    logp = F.log_softmax(logits, dim=-1)
    weight = torch.full_like(logp, eps / (logits.shape[-1] - 1)).scatter_(-1, y.unsqueeze(-1), 1.0 - eps)
    per_sample = -(weight * logp).sum(-1)
    return per_sample.mean() if reduction == "mean" else per_sample


def refuse_extensions(cfg) -> None:
    """The framework's extensions that would change the result: refused, not silently ignored."""
    t = cfg.train
    used = {
        "train.accum_steps": t.accum_steps != 1,
        "train.no_decay": bool(t.no_decay),
        "train.norm_lr_scale": t.norm_lr_scale != 1.0,
        "train.ema": t.ema is not None,
        "train.lookahead": t.lookahead is not None,
        "run.precision=fp16": cfg.run.precision == "fp16",
        "eval.tta": cfg.eval.tta != "none",
    }
    if any(used.values()):
        keys = ", ".join(k for k, on in used.items() if on)
        sys.exit(f"minimal_train.py: {keys}: not in this example; use cifar-dist train")
    if t.exact_reduce:  # one process: the same gradient, summed in another order
        print("note: train.exact_reduce (chunked, tree-summed gradients) is the framework's; here one plain backward")


def train(cfg):
    """Train as ``cfg`` says; returns the plain model and the per-epoch rows."""
    refuse_extensions(cfg)
    t, d = cfg.train, cfg.data
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if device.type == "cuda":  # (the CPU kernels used here are deterministic as they are)
        if cfg.run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS's first use
            torch.use_deterministic_algorithms(True)
        tf32 = cfg.run.tf32 and not cfg.run.deterministic  # TF32 tensor cores for fp32 work: not bitwise repeatable
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    precision = cfg.run.precision  # auto: bf16 on GPUs with bf16 tensor cores (the framework also probes CPUs)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 0) else "fp32"

    # Data: the whole set on the device as uint8; every random choice is a function of (seed, epoch, index).
    train_set, test_set, _ = build_datasets(cfg)
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    spec = AugmentSpec.from_config(d)
    mean = torch.tensor(d.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(d.std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255
    memory_format = torch.channels_last if cfg.run.channels_last else torch.contiguous_format

    def normalize(x):  # uint8 [B, 3, 32, 32] -> float32, in the model's memory format
        return ((x.float() - mean) / std).contiguous(memory_format=memory_format)

    # Model: seeded right before it is built, so its initial weights depend on run.seed alone.
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model)  # every BatchNorm normalizes over model.bn_group samples (0: the batch)
    if hasattr(model, "init_from_data") or hasattr(model, "frozen_parameters"):
        sys.exit(f"minimal_train.py: model.name={cfg.model.name} needs the framework (data-dependent init, freezing)")
    model = model.to(device, memory_format=memory_format)
    forward = torch.compile(model) if cfg.run.compile else model
    fused = t.optimizer_impl == "fused" or (t.optimizer_impl == "auto" and device.type == "cuda")
    kernels = {"fused": True} if fused else {}
    params, decay = model.parameters(), t.weight_decay  # adam and sgd: L2 in the gradient (the paper's)
    if t.optimizer == "sgd":
        nesterov = t.nesterov and t.momentum > 0
        opt = torch.optim.SGD(params, t.lr, t.momentum, weight_decay=decay, nesterov=nesterov, **kernels)
    else:  # adamw: decoupled decay
        adam = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
        opt = adam(params, t.lr, betas=tuple(t.betas), weight_decay=decay, **kernels)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")

    steps_per_epoch = len(train_set) // t.batch_size  # the last incomplete batch is dropped
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch - 1e-9)
    print(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters on {device}, {precision}; "
          f"batch {t.batch_size}, {steps_per_epoch} steps/epoch, {total_steps} steps")  # fmt: skip
    step, rows = 0, []
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        started, seen, correct = time.perf_counter(), 0, 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no host read per step
        order = epoch_order(cfg.run.seed, epoch, len(train_set)).to(device)
        for i in range(min(steps_per_epoch, total_steps - step)):
            idx = order[i * t.batch_size : (i + 1) * t.batch_size]
            x, y = augment(images[idx], idx, epoch, cfg.run.seed, spec), labels[idx]
            lr = lr_at(step, t, steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast:
                logits = forward(normalize(x))
            loss = smoothed_loss(logits, y, t.label_smoothing, t.smoothing_form)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync_bn_statistics(model)  # the BatchNorm running statistics: this step's groups, averaged
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen, step = seen + len(y), step + 1
        row = {"epoch": epoch + 1, "step": step, "train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen}
        if (epoch + 1) % cfg.eval.every_epochs == 0 or step == total_steps:
            row.update(evaluate(forward, test_set, cfg, normalize, autocast, device))
        row.update(lr=lr, epoch_time_s=time.perf_counter() - started)
        rows.append(row)
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return model, rows


@torch.no_grad()
def evaluate(forward, data, cfg, normalize, autocast, device) -> dict:
    """Loss and accuracy over the whole evaluation set, BatchNorm on its running statistics."""
    forward.eval()
    loss_sum, correct = 0.0, 0
    for s in range(0, len(data), cfg.data.eval_batch_size):
        x = data.images[s : s + cfg.data.eval_batch_size].to(device)
        y = data.labels[s : s + cfg.data.eval_batch_size].to(device)
        with autocast:
            logits = forward(normalize(x)).float()
        losses = smoothed_loss(logits, y, cfg.train.label_smoothing, cfg.train.smoothing_form, reduction="none")
        loss_sum += float(losses.double().sum())
        correct += int((logits.argmax(1) == y).sum())
    forward.train()
    return {"test_loss": loss_sum / len(data), "test_acc": correct / len(data)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML recipe (configs/seed.yaml is the paper's); without one, the defaults")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.01")
    args = ap.parse_args(argv)
    return train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
