"""The paper's model exactly (Figure 1), the other architectures, and group BatchNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifar_dist.config.loading import load_config
from cifar_dist.model.batchnorm import GroupBatchNorm2d, sync_bn_statistics
from cifar_dist.model.layer_table import count_flops, layer_table
from cifar_dist.model.resnet import build_model, count_parameters

from conftest import REPO, cli_here

FIGURE1 = REPO / "tests" / "figure1.tsv"  # the paper's Figure 1, copied from ../shared/paper


def paper_rows():
    lines = FIGURE1.read_text().splitlines()[1:]
    return [(name, shape.replace(" ", ""), int(params)) for name, shape, params in (line.split("\t") for line in lines)]


def model(*overrides):
    return build_model(load_config(None, list(overrides)).model)


def test_seed_resnet_has_the_papers_parameter_count():
    assert count_parameters(model()) == 4_916_284


def test_every_row_matches_figure1():
    ours = [(name, str(shape).replace(" ", ""), params) for name, shape, params in layer_table(model())]
    paper = paper_rows()
    assert len(ours) == len(paper) == 58
    for mine, theirs in zip(ours, paper):
        assert mine == theirs


def test_forward_and_training_flops():
    m = model()
    assert abs(count_flops(m) / 2e9 - 0.769) < 0.001  # GMAC per image
    assert abs(count_flops(m, train=True) / 1e9 - 4.61) / 4.61 < 0.01


def test_summary_command_prints_table_and_total():
    res = cli_here("summary")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "Total params: 4,916,284" in out
    assert "0.769 GMAC" in out
    assert "BasicBlock-56" in out and "Linear-58" in out


def test_shape_overrides_and_other_architectures():
    tiny = model("model.widths=[8,16,32]", "model.blocks=[1,1,1]")
    assert count_parameters(tiny) < 30_000
    for name in ("resnet9", "resnet18"):
        m = model(f"model.name={name}")
        assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert count_parameters(model("model.name=resnet18")) == 11_173_962


def test_weights_load_into_plain_batchnorm_layers():
    """The state dict is a plain BatchNorm2d's: no extra keys, loads into the paper's layers."""
    m = model("model.bn_group=8")
    state = m.state_dict()
    assert not any("stat_" in k for k in state)
    plain = model()
    for _name, mod in list(plain.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, GroupBatchNorm2d):
                setattr(mod, child_name, torch.nn.BatchNorm2d(child.num_features))
    plain.load_state_dict(state, strict=True)


def test_group_batchnorm_equals_batchnorm_per_group():
    torch.manual_seed(0)
    for channels_last in (False, True):
        x = torch.randn(32, 6, 5, 5)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bn = GroupBatchNorm2d(6, group=8)
        with torch.no_grad():
            bn.weight.uniform_()
            bn.bias.uniform_()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = bn(x1)
        (y1**2).sum().backward()
        y2 = torch.cat(
            [F.batch_norm(x2[i : i + 8], None, None, bn.weight, bn.bias, True, 0.1, bn.eps) for i in range(0, 32, 8)]
        )
        w_grad = bn.weight.grad.clone()
        bn.weight.grad = None
        (y2**2).sum().backward()
        assert torch.allclose(y1, y2, atol=1e-5)
        assert torch.allclose(x1.grad, x2.grad, atol=1e-4)
        assert torch.allclose(w_grad, bn.weight.grad, atol=1e-4)


def test_running_statistics_average_groups_and_forwards():
    torch.manual_seed(0)
    bn = GroupBatchNorm2d(3, group=4, momentum=0.5)
    xs = [torch.randn(8, 3, 4, 4) + 2 for _ in range(2)]
    for x in xs:
        bn(x)
    sync_bn_statistics(bn)
    groups = torch.cat(xs).view(4, 4, 3, 4, 4)
    mean = groups.mean(dim=(1, 3, 4)).mean(0)
    var = groups.var(dim=(1, 3, 4), unbiased=True).mean(0)
    assert torch.allclose(bn.running_mean, 0.5 * mean, atol=1e-5)
    assert torch.allclose(bn.running_var, 0.5 + 0.5 * var, atol=1e-5)
    assert int(bn.num_batches_tracked) == 1
    assert float(bn.stat_count) == 0 and float(bn.stat_sum.abs().sum()) == 0


def test_resnet9_pools_with_a_deterministic_global_max():
    """AdaptiveMaxPool2d has no deterministic CUDA backward; GlobalMaxPool gives the same
    values and gradients (no ties in random data), and the weights keep their names."""
    from cifar_dist.model.resnet import GlobalMaxPool

    model = build_model(load_config(None, ["model.name=resnet9"]).model)
    assert not any(isinstance(m, torch.nn.AdaptiveMaxPool2d) for m in model.modules())
    keys = list(model.state_dict())  # the layout of earlier ResNet-9 checkpoints
    assert (count_parameters(model), len(keys), keys[-3:]) == (
        6_573_120,
        49,
        ["net.5.body.1.bn.running_var", "net.5.body.1.bn.num_batches_tracked", "linear.weight"],
    )
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    ours, theirs = GlobalMaxPool()(x), F.adaptive_max_pool2d(y, 1)
    assert torch.equal(ours, theirs)
    (ours * torch.arange(32.0, dtype=torch.float64).view(4, 8, 1, 1)).sum().backward()
    (theirs * torch.arange(32.0, dtype=torch.float64).view(4, 8, 1, 1)).sum().backward()
    assert torch.equal(x.grad, y.grad)


def _per_layer_update(model, extra):
    """The per-layer form of sync_bn_statistics (13 small operations per layer), the reference."""
    layers = [m for m in model.modules() if isinstance(m, GroupBatchNorm2d)]
    flat = torch.cat([torch.cat([m.stat_sum.flatten(), m.stat_count.view(1)]) for m in layers] + [extra])
    offset = 0
    for m in layers:
        k = 2 * m.num_features
        sums, count = flat[offset : offset + k].view(2, -1), flat[offset + k]
        offset += k + 1
        rate = m.momentum * (count > 0).float()
        m.running_mean.lerp_(sums[0] / count.clamp(min=1), rate)
        m.running_var.lerp_(sums[1] / count.clamp(min=1), rate)
        m.num_batches_tracked.add_((count > 0).long())
        m.stat_sum.zero_()
        m.stat_count.zero_()
    return flat[offset:]


def _bn_step(blocks):
    """A model with ``blocks`` BasicBlocks per stage after two forwards of 32 images."""
    torch.manual_seed(0)
    model = build_model(load_config(None, [f"model.blocks={blocks}", "model.widths=[4,8,8]", "model.bn_group=8"]).model)
    for _ in range(2):
        model(torch.randn(32, 3, 32, 32))
    return model


def test_bn_update_is_a_few_operations_whatever_the_depth():
    """The per-step update launches the same few kernels for 7 or 23 BatchNorm layers (the
    per-layer form launched 13 per layer); only views of the flat tensor grow with depth."""
    from torch.overrides import TorchFunctionMode

    views = {torch.Tensor.view, torch.Tensor.__getitem__, torch.Tensor.split, torch.Tensor.unbind, torch.Tensor.flatten}

    class Kernels(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func not in views and not getattr(func, "__name__", "").startswith("__get"):
                self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    launched = {}
    for blocks in ([1, 1, 1], [3, 4, 3]):
        model = _bn_step(blocks)
        sync_bn_statistics(model, extra=torch.zeros(2))  # builds the layout once
        model(torch.randn(32, 3, 32, 32))
        with Kernels() as k:
            sync_bn_statistics(model, extra=torch.zeros(2))
        launched[sum(isinstance(m, GroupBatchNorm2d) for m in model.modules())] = k.names
    print(f"kernels per BatchNorm update, by layer count: { {n: len(v) for n, v in launched.items()} }")
    (few, shallow), (many, deep) = sorted(launched.items())
    assert many > 2 * few and deep == shallow and len(deep) <= 20, launched


def test_bn_update_equals_the_per_layer_form_bitwise():
    ours, reference = _bn_step([2, 2, 2]), _bn_step([2, 2, 2])
    extra = torch.tensor([1.0, 2.0])
    got = sync_bn_statistics(ours, extra=extra.clone())
    want = _per_layer_update(reference, extra.clone())
    assert torch.equal(got, want)
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_peak_table_tells_similar_gpus_apart_and_uses_tf32_for_fp32_work():
    """MFU divides by these peaks: an NVL part is not an SXM one, an L40 not an L4, an A100
    not an A10, and fp32 work on TF32 tensor cores is measured against the TF32 peak."""
    from cifar_dist.runtime.hardware import device_peak, table_peak

    names = [
        "NVIDIA H200",
        "NVIDIA H200 NVL",
        "NVIDIA H100 80GB HBM3",
        "NVIDIA H100 NVL",
        "NVIDIA H100 PCIe",
        "NVIDIA L40S",
        "NVIDIA L40",
        "NVIDIA L4",
        "NVIDIA A100-SXM4-80GB",
        "NVIDIA A10",
    ]
    peaks = {n: table_peak(n, "bf16") for n in names}
    assert peaks["NVIDIA H200 NVL"] != peaks["NVIDIA H200"] and peaks["NVIDIA H100 NVL"] != peaks["NVIDIA H100 PCIe"]
    assert len({peaks[n] for n in ("NVIDIA L40S", "NVIDIA L40", "NVIDIA L4")}) == 3
    assert peaks["NVIDIA A100-SXM4-80GB"] == 312e12 and peaks["NVIDIA A10"] == 125e12
    gpu = torch.device("cuda")  # only its type is read: the table needs no GPU
    assert device_peak(gpu, "NVIDIA H200", "fp32", tf32=True) == (494e12, "table (TF32)")
    assert device_peak(gpu, "NVIDIA H200", "fp32", tf32=False) == (67e12, "table")
    assert device_peak(gpu, "NVIDIA H200", "bf16", tf32=True) == (989e12, "table")
