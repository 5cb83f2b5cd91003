"""Command-line arguments of the benchmark (`cifar-dist bench` and `python -m cifar_dist.bench`)."""

from __future__ import annotations

import argparse

from cifar_dist.config.numbers import count


def _list(kind):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if kind is bool:
            table = {"on": True, "off": False, "true": True, "false": False}
            if any(i not in table for i in items):
                raise argparse.ArgumentTypeError(f"expected on/off values, got {text!r}")
            return [table[i] for i in items]
        try:
            values = [kind(i) for i in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return values

    return parse


def add_bench_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--config",
        help="YAML recipe the rows start from (configs/seed.yaml is the paper's; without "
        "one, the built-in defaults, which `cifar-dist config` prints)",
    )
    ap.add_argument("--out", help="directory for bench.json, bench.md and bench.png (default runs/bench-<time>)")
    ap.add_argument(
        "--compile", type=_list(bool), default=[False], metavar="off,on", help="torch.compile off and/or on"
    )
    ap.add_argument("--precision", type=_list(str), default=["fp32"], metavar="fp32,bf16,fp16")
    ap.add_argument("--channels-last", type=_list(bool), default=[False], metavar="off,on")
    ap.add_argument(
        "--batch-sizes", type=_list(count(1)), default=[128], metavar="128,256", help="images per device per step"
    )
    ap.add_argument(
        "--loaders",
        type=_list(str),
        default=["synthetic"],
        metavar="synthetic,torch,gpu,ffcv",
        help="synthetic: one device-resident batch (the step alone); others: real CIFAR-10",
    )
    ap.add_argument(
        "--workers",
        type=_list(count(0)),
        default=None,
        metavar="0,2",
        help="loader workers (default: data.workers of the config)",
    )
    ap.add_argument("--warmup", type=count(0), default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--steps", type=count(1), default=10, help="timed steps per repeat")
    ap.add_argument("--repeats", type=count(1), default=3, help="timed repeats; medians are reported")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain PyTorch baseline")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after its timed repeats, profile each row (not the baseline) over run.profile.steps steps "
        "(default 3): a trace per rank in OUT/profile/<row>/ (docs/observability.md)",
    )
    ap.add_argument(
        "--loader-only", action="store_true", help="time the input pipelines alone (images/s of each loader), no model"
    )
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.name=resnet9")
