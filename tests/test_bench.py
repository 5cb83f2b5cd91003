"""`cifar-dist bench`: a tiny matrix of the paper's model for a few steps. Only the
shape and sanity of the output are asserted here; speed is measured, never tested."""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO, cli
from helpers import TINY_BENCH

pytestmark = pytest.mark.slow

FIELDS = (
    "images_per_s",
    "images_per_s_per_device",
    "step_time_median_s",
    "step_time_p90_s",
    "flops_per_image",
    "achieved_flops_per_device",
    "peak_flops",
    "speedup_vs_baseline",
    "peak_memory_mib",
)


def test_bench_writes_every_figure_and_counts_the_papers_flops(tmp_path):
    out = tmp_path / "bench"
    res = cli(
        "bench",
        "--config",
        REPO / "configs" / "seed.yaml",
        "--out",
        out,
        "--batch-sizes",
        "4",
        "--channels-last",
        "on",
        "--precision",
        "fp32,bf16",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--repeats",
        "1",
        "run.threads=2",
    )
    result = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").read_text().strip() and (out / "bench.png").stat().st_size > 1000
    assert result["model"] == "seed_resnet" and result["hardware"]["world_size"] == 1
    assert result["hardware"]["device"]
    rows = result["rows"]
    assert [r["baseline"] for r in rows] == [True, False, False]
    assert result["hardware"]["parameters"] == 4_916_284  # what `scripts/plan.py --bench` reads
    for r in rows:
        for key in FIELDS:
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["label"], key)
        # MFU is a share of a peak: never above 1; None (n/a) where the peak is unknown or implausible
        assert r["mfu"] is None or 0 < r["mfu"] <= 1, (r["label"], r["mfu"])
        # The counted training FLOPs per image: 3 x the 0.769 GMAC forward pass = 4.61 GFLOP.
        assert abs(r["flops_per_image"] - 4.61e9) <= 0.01 * 4.61e9
    table = [line.split("|") for line in res.stdout.splitlines() if line.startswith("| ") and "b4" in line]
    mfu_cells = [cells[9].strip() for cells in table]
    assert len(mfu_cells) == 3 and all(c == "n/a" or 0 < float(c.rstrip("%")) <= 100 for c in mfu_cells), mfu_cells
    assert "| baseline b4 (plain PyTorch loop) |" in res.stdout and "img/s/device" in res.stdout


def _bench(out, *args):
    cli(
        "bench",
        "--config",
        REPO / "configs" / "smoke.yaml",
        "--out",
        out,
        "--no-baseline",
        *args,
        *TINY_BENCH,
    )
    return json.loads((out / "bench.json").read_text())["rows"]


@pytest.mark.timeout(900)
def test_a_compiled_row_starts_from_a_fresh_compile_state(tmp_path):
    """The twelfth compiled row of a matrix compiles the same graphs as the same row run
    alone: no code, guards or recompile budget is shared with the rows before it (which
    could turn a 'compile' row eager once the recompile limit is hit). Every row reports
    the precision it ran in."""
    matrix = _bench(
        tmp_path / "matrix",
        "--compile",
        "on",
        "--precision",
        "fp32,bf16",
        "--channels-last",
        "off,on",
        "--batch-sizes",
        "16,32,48",
    )
    alone = _bench(
        tmp_path / "alone", "--compile", "on", "--precision", "bf16", "--channels-last", "on", "--batch-sizes", "48"
    )
    assert len(matrix) == 12 and matrix[-1]["label"] == alone[0]["label"]
    assert [r["precision_used"] for r in matrix] == [r["settings"]["precision"] for r in matrix]
    assert all(r["compiled_graphs"] > 0 for r in matrix)
    assert matrix[-1]["compiled_graphs"] == alone[0]["compiled_graphs"]
    print(
        f"{alone[0]['label']}: {matrix[-1]['images_per_s']:.0f} img/s as row 12, "
        f"{alone[0]['images_per_s']:.0f} img/s alone"
    )
