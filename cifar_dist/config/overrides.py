"""``key=value`` overrides: command lines that accept them anywhere (before, between and after
options), and a value written as an override writes it.

argparse stops filling an ``nargs='*'`` positional at the first option, so
``train --config F a.b=1 --out D c.d=2`` would leave ``c.d=2`` unrecognized;
here every leftover ``key=value`` joins the overrides, in the order given.
"""

from __future__ import annotations

import argparse

import yaml


def parse_with_overrides(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def override_text(value) -> str:
    """``value`` as the right side of a ``key=value`` override: flip, 0.98, [norm, bias],
    {decay: 0.98, every_steps: 1}, null (how messages and tables show a config value)."""
    if isinstance(value, str):
        return value
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1_000)
    return text.strip().removesuffix("...").strip()
