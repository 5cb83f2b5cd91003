"""What the hardware can do, as cifar_dist decides it: bf16 on CPUs, measured peaks, MFU."""

from __future__ import annotations

import pytest

from cifar_dist.runtime import hardware
from cifar_dist.runtime.hardware import resolve_precision

AVX2_ONLY = "fpu sse sse2 avx fma avx2 bmi2"  # an AMD EPYC without bf16 units
AVX512_BF16 = AVX2_ONLY + " avx512f avx512_bf16"  # AMD Zen 4, Intel Cooper Lake
AMX = AVX2_ONLY + " avx512f amx_tile amx_bf16 amx_int8"  # Intel Sapphire Rapids and later


def _units(flags: str) -> bool:
    return hardware.has_bf16_units(set(flags.split()))


@pytest.mark.parametrize("flags, expected", [(AVX2_ONLY, "fp32"), (AVX512_BF16, "bf16"), (AMX, "bf16")])
def test_auto_on_a_cpu_picks_bf16_only_with_bf16_units(flags, expected):
    assert resolve_precision("auto", None, _units(flags)) == (expected, None)
    assert resolve_precision("fp32", None, _units(flags)) == ("fp32", None)


def test_explicit_bf16_on_a_cpu_without_bf16_units_warns():
    precision, warning = resolve_precision("bf16", None, _units(AVX2_ONLY))
    assert precision == "bf16"
    assert warning == (
        "run.precision=bf16 on a CPU without bf16 units (no AMX or AVX-512 bf16 in its flags), "
        "where bf16 runs several times slower than fp32; run.precision=auto or fp32 is faster"
    )
    assert resolve_precision("bf16", None, _units(AMX)) == ("bf16", None)


def test_the_cpu_demo_uses_auto():
    from cifar_dist.config.loading import load_config

    from conftest import REPO

    assert load_config(REPO / "configs" / "cpu_quick.yaml").run.precision == "auto"
    assert load_config(REPO / "configs" / "smoke.yaml").run.precision == "fp32"  # the tests compare bits


def test_measurements_are_cached_per_machine_and_shared_by_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_DIST_CACHE_DIR", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return 123.0

    assert hardware.cached("peak|test", measure) == 123.0
    assert hardware.cached("peak|test", measure) == 123.0
    assert calls == [1]
    (tmp_path / "probes.json").write_text("{not json")  # a damaged cache costs one measurement
    assert hardware.cached("peak|test", measure) == 123.0 and calls == [1, 1]


def test_a_slow_precision_is_measured_on_a_small_product(monkeypatch):
    """bf16 on a CPU without bf16 units ran at 0.2 GFLOP/s: a 2048^3 product would take 80 s.
    The size grows only while one product takes under 20 ms."""
    sizes = []

    def seconds(n, dtype, device, repeats, budget_s):
        sizes.append(n)
        return 2 * n**3 / 0.2e9  # 0.2 GFLOP/s

    monkeypatch.setattr(hardware, "_matmul_seconds", seconds)
    import torch

    assert hardware.measured_peak(torch.device("cpu"), "bf16") == pytest.approx(0.2e9)
    assert max(sizes) == 256


def test_mfu_is_never_above_one():
    assert hardware.mfu(50.0, 100.0) == 0.5
    assert hardware.mfu(1359.5, 100.0) is None  # a peak below what was achieved is not a peak
    assert hardware.mfu(1.0, None) is None and hardware.mfu(1.0, 0.0) is None
    from cifar_dist.bench.table import _percent

    assert _percent(None) == "n/a" and _percent(13.595) == "n/a" and _percent(0.123) == "12.3%"
