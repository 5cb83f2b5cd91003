"""`python -m cifar_dist.bench` / `accelerate launch -m cifar_dist.bench`: the benchmark under any launcher."""
from __future__ import annotations

import argparse
import sys

from cifar_dist.bench import __doc__ as DOC
from cifar_dist.bench.args import add_bench_arguments
from cifar_dist.config.overrides import parse_with_overrides
from cifar_dist.errors import guarded


def main(argv=None) -> int:
    from cifar_dist.bench.run import run_bench
    from cifar_dist.runtime.malloc import tune_malloc

    tune_malloc()
    ap = argparse.ArgumentParser(prog="python -m cifar_dist.bench", description=DOC.split("\n\n")[0])
    add_bench_arguments(ap)
    return guarded(run_bench, parse_with_overrides(ap, argv))


if __name__ == "__main__":
    sys.exit(main())
