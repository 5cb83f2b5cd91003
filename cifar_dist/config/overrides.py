"""Command lines that accept ``key=value`` overrides anywhere: before, between and after options.

argparse stops filling an ``nargs='*'`` positional at the first option, so
``train --config F a.b=1 --out D c.d=2`` would leave ``c.d=2`` unrecognized;
here every leftover ``key=value`` joins the overrides, in the order given.
"""

from __future__ import annotations

import argparse


def parse_with_overrides(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args
