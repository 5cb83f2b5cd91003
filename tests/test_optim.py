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


def _small_net():
    """A conv with a bias, BatchNorm and a linear layer: every kind of parameter no_decay names."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=True),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 2 * 2, 10),
    )


@pytest.mark.parametrize(
    "groups, undecayed",
    [
        ([], []),
        (["norm"], ["1.weight", "1.bias"]),
        (["bias"], ["0.bias", "1.bias", "3.bias"]),
        (["norm", "bias"], ["0.bias", "1.weight", "1.bias", "3.bias"]),
    ],
)
def test_no_decay_builds_a_group_of_its_parameters_once(groups, undecayed):
    from cifar_dist.model.optim import param_groups

    net = _small_net()
    t = load_config(None, [f"train.no_decay={groups}"]).train
    built = param_groups(net, t)
    names = {id(p): n for n, p in net.named_parameters()}
    if not groups:  # the paper's recipe: the parameters themselves, one group, as before no_decay
        assert built == list(net.parameters())
        return
    assert [sorted(names[id(p)] for p in g["params"]) for g in built] == [
        sorted(set(names.values()) - set(undecayed)),
        sorted(undecayed),
    ]
    assert "weight_decay" not in built[0] and built[1]["weight_decay"] == 0.0


def test_no_decay_norm_finds_every_batchnorm_of_the_paper_model():
    from cifar_dist.model.optim import param_groups
    from cifar_dist.model.resnet import build_model

    model = build_model(load_config(REPO / "configs" / "smoke.yaml").model)
    t = load_config(None, ["train.no_decay=[norm]"]).train
    decayed, undecayed = param_groups(model, t)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".bn" in f".{names[id(p)]}" or "shortcut.1" in names[id(p)] for p in undecayed["params"])
    assert all(p.dim() > 1 or names[id(p)] == "linear.bias" for p in decayed["params"])
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(undecayed["params"]) == 2 * len(bn) > 0


@pytest.mark.parametrize(
    "norm",
    [
        lambda: torch.nn.BatchNorm1d(4),
        lambda: torch.nn.SyncBatchNorm(4),
        lambda: torch.nn.InstanceNorm1d(4, affine=True),
        lambda: torch.nn.GroupNorm(2, 4),
        lambda: torch.nn.LayerNorm(4),
        lambda: torch.nn.RMSNorm(4),
    ],
    ids=["batch", "sync_batch", "instance", "group", "layer", "rms"],
)
def test_no_decay_norm_finds_each_kind_of_normalization_layer(norm):
    """A user's model may normalize any way torch does; ``norm`` leaves each one's affine
    parameters undecayed and the linear weight decayed."""
    from cifar_dist.model.optim import param_groups

    net = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), norm())
    decayed, undecayed = param_groups(net, load_config(None, ["train.no_decay=[norm]"]).train)
    assert decayed["params"] == [net[0].weight]
    assert undecayed["params"] == list(net[1].parameters()) and len(undecayed["params"]) >= 1


def test_no_decay_norm_finds_the_projects_group_batchnorm():
    from cifar_dist.model.batchnorm import GroupBatchNorm2d
    from cifar_dist.model.optim import param_groups

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), GroupBatchNorm2d(4, group=2))
    decayed, undecayed = param_groups(net, load_config(None, ["train.no_decay=[norm]"]).train)
    assert decayed["params"] == [net[0].weight] and undecayed["params"] == list(net[1].parameters())


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_no_decay_parameters_do_not_decay_in_a_step(name, impl):
    """A step with zero gradients: only weight decay moves a parameter, so the decayed ones
    move and the norm and bias ones stay put, with every optimizer and kernel; every group
    follows the one learning rate."""
    from cifar_dist.model.optim import param_groups, set_lr

    net = _small_net()
    t = load_config(
        None,
        [f"train.optimizer={name}", f"train.optimizer_impl={impl}", "train.no_decay=[norm, bias]", "train.lr=0.1"],
    ).train
    t.weight_decay = 0.01
    opt = build_optimizer(param_groups(net, t), t, "cpu")
    assert bool(opt.defaults.get("fused")) == (impl == "fused")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    set_lr(opt, 0.05)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        if n.endswith("bias") or n.startswith("1."):
            assert torch.equal(p, before[n]), n
        else:
            assert not torch.equal(p, before[n]), n
    if name == "sgd":  # by hand: the first buffer is wd * w, Nesterov steps by (1 + momentum) of it
        torch.testing.assert_close(net[0].weight, before["0.weight"] * (1 - 0.05 * 0.01 * (1 + 0.9)))
    if name == "adamw":  # decoupled: w * (1 - lr * wd), the Adam part is 0 for a zero gradient
        torch.testing.assert_close(net[0].weight, before["0.weight"] * (1 - 0.05 * 0.01))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deepspeed_keeps_the_no_decay_groups(tmp_path):
    """DeepSpeed ZeRO-2 takes the optimizer with its groups: its weights after 16 steps with
    train.no_decay are DDP's with the same groups (a large weight decay makes a lost group show:
    it moves the BatchNorm weights by about 0.4 in these steps)."""
    pytest.importorskip("deepspeed")
    from conftest import SMOKE, accelerate_launch, load_weights, max_diff, torchrun

    args = [
        "--config",
        SMOKE,
        "train.exact_reduce=false",  # refused under DeepSpeed
        "data.synthetic_train=512",
        "train.max_steps=16",
        "train.weight_decay=0.05",
        "train.no_decay=[norm, bias]",
        "run.progress=false",
        "run.plots=false",
    ]
    torchrun(2, "--out", tmp_path / "ddp", *args)
    res = accelerate_launch("deepspeed_zero2.yaml", 2, "--out", tmp_path / "ds", *args, module=True)
    assert "DeepSpeed ZeRO-2" in res.stdout
    assert max_diff(load_weights(tmp_path / "ddp"), load_weights(tmp_path / "ds")) <= 1e-4
