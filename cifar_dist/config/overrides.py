"""``key=value`` overrides anywhere on a command line, and a value written as one: argparse stops filling
an ``nargs='*'`` positional at the first option, so leftover ``key=value`` arguments join the overrides."""

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
    """``value`` as the right side of an override (``[norm, bias]``, ``null``), as messages show it."""
    if isinstance(value, str):
        return value
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1_000)
    return text.strip().removesuffix("...").strip()
