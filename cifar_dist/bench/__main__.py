"""`python -m cifar_dist.bench` / `accelerate launch -m cifar_dist.bench`: the benchmark under any launcher."""

from __future__ import annotations

import sys

from cifar_dist.bench.args import add_bench_arguments
from cifar_dist.config.numbers import OneLineParser
from cifar_dist.config.overrides import parse_with_overrides
from cifar_dist.distributed.launcher import rank_prefix
from cifar_dist.errors import guarded
from cifar_dist.runtime.malloc import tune_malloc


def main(argv=None) -> int:
    from cifar_dist.bench import run  # the training stack: heavy, after the arguments are read

    tune_malloc()
    ap = OneLineParser(prog="python -m cifar_dist.bench", description=run.__doc__.split("\n\n")[0])
    add_bench_arguments(ap)
    return guarded(run.run_bench, parse_with_overrides(ap, argv), rank_prefix)


if __name__ == "__main__":
    sys.exit(main())
