"""The learning rate as a pure function of the step, and the paper's loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cifar_dist.config.loading import load_config
from cifar_dist.model.loss import smoothed_cross_entropy
from cifar_dist.model.optim import build_optimizer, lr_at

from conftest import REPO


def test_paper_schedule_equals_its_lambdalr_stepped_per_epoch():
    cfg = load_config(REPO / "configs" / "seed.yaml")
    epochs, spe = cfg.train.epochs, 390

    def notebook(epoch):  # the paper notebook's warmup_with_cosine_lr
        if epoch < 5:
            return epoch / 5
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - 5) / (epochs - 5)))

    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, notebook)
    for epoch in range(epochs):
        for step in (epoch * spe, epoch * spe + spe - 1):
            assert math.isclose(lr_at(step, cfg.train, spe), opt.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-15)
        opt.step()
        sched.step()
    assert lr_at(0, cfg.train, spe) == 0.0  # the notebook's first epoch runs at lr 0


def test_step_schedules():
    t = load_config(None, ["train.schedule=onecycle", "train.lr=0.4", "train.epochs=10", "train.warmup_epochs=2"]).train
    assert lr_at(0, t, 100) == 0 and math.isclose(lr_at(200, t, 100), 0.4)
    assert math.isclose(lr_at(600, t, 100), 0.2) and lr_at(1000, t, 100) == 0
    t = load_config(None, ["train.schedule=step", "train.lr=1", "train.milestones=[2,4]", "train.gamma=0.5"]).train
    assert [lr_at(e * 10, t, 10) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    t = load_config(None, ["train.schedule=warmup_cosine", "train.warmup_epochs=0", "train.epochs=4"]).train
    assert lr_at(0, t, 10) == t.lr and math.isclose(lr_at(20, t, 10), t.lr / 2)


def test_paper_label_smoothing_matches_the_notebook():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 10), torch.randint(0, 10, (16,))
    logp = F.log_softmax(logits, -1)
    weight = torch.full_like(logp, 0.1 / 9).scatter_(-1, target[:, None], 0.9)
    notebook = (-weight * logp).sum(-1).mean()
    assert torch.allclose(smoothed_cross_entropy(logits, target, 0.1, "paper"), notebook)
    assert torch.allclose(
        smoothed_cross_entropy(logits, target, 0.1, "torch"), F.cross_entropy(logits, target, label_smoothing=0.1)
    )
    per = smoothed_cross_entropy(logits, target, 0.1, "paper", reduction="none")
    assert per.shape == (16,) and torch.allclose(per.mean(), notebook)


def test_optimizers():
    p = [torch.nn.Parameter(torch.ones(3))]
    cfg = load_config(None, ["train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.9"]).train
    sgd = build_optimizer(p, cfg)
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["momentum"] == 0.9
    adam = build_optimizer(p, load_config(None).train)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["weight_decay"] == 1e-4


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_and_foreach_optimizers_agree(name):
    """train.optimizer_impl picks the fused kernels (auto: on GPUs only); same update as foreach."""
    from cifar_dist.model.optim import use_fused

    cfg = load_config(None, [f"train.optimizer={name}", "train.weight_decay=0.01"]).train
    assert not use_fused(cfg, "cpu") and use_fused(cfg, "cuda")
    torch.manual_seed(0)
    start = [torch.randn(5, 7), torch.randn(7)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(5)]
    results = []
    for impl in ("foreach", "fused"):
        cfg.optimizer_impl = impl
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = build_optimizer(params, cfg, "cpu")
        assert bool(opt.defaults.get("fused")) == (impl == "fused")
        for step in grads:
            for q, g in zip(params, step):
                q.grad = g.clone()
            opt.step()
        results.append([q.detach() for q in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
