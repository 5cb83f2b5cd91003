"""Command-line arguments of the benchmark (shared by `cifar-dist bench` and bench.py)."""
from __future__ import annotations

import argparse


def add_bench_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="YAML recipe the benchmark starts from (default: the paper's)")
    ap.add_argument("--out", help="directory for bench.json, bench.md and bench.png")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
