"""`cifar-dist bench`: a tiny matrix of the paper's model for a few steps. Only the
shape and sanity of the output are asserted here; speed is measured, never tested."""
from __future__ import annotations

import json
import math

import pytest

from conftest import REPO, cli

pytestmark = pytest.mark.slow

FIELDS = ("images_per_s", "images_per_s_per_device", "step_time_median_s", "step_time_p90_s",
          "flops_per_image", "achieved_flops_per_device", "peak_flops", "mfu", "speedup_vs_baseline",
          "peak_memory_mib")


def test_bench_writes_every_figure_and_counts_the_papers_flops(tmp_path):
    out = tmp_path / "bench"
    res = cli("bench", "--config", REPO / "configs" / "seed.yaml", "--out", out,
              "--batch-sizes", "4", "--channels-last", "on", "--precision", "fp32",
              "--warmup", "1", "--steps", "2", "--repeats", "1", "run.threads=2")
    result = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").read_text().strip() and (out / "bench.png").stat().st_size > 1000
    assert result["model"] == "seed_resnet" and result["hardware"]["world_size"] == 1
    assert result["hardware"]["device"]
    rows = result["rows"]
    assert [r["baseline"] for r in rows] == [True, False]
    for r in rows:
        for key in FIELDS:
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["label"], key)
        # The counted training FLOPs per image: 3 x the 0.769 GMAC forward pass = 4.61 GFLOP.
        assert abs(r["flops_per_image"] - 4.61e9) <= 0.01 * 4.61e9
    assert "| baseline b4 (plain PyTorch loop) |" in res.stdout and "img/s/device" in res.stdout
