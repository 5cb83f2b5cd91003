"""argparse types that refuse, naming the option, numbers no command can use (a zero count, a
negative, NaN, infinity): one line and exit 2 before anything runs."""

from __future__ import annotations

import argparse
import math


def count(minimum: int = 1):
    """A whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    parse.__name__ = "count"  # argparse names the type in its messages
    return parse


def real(low: float = 0.0, high: float = math.inf, low_open: bool = True):
    """A finite number in (low, high] (``low_open``) or [low, high]."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else None
    expected = f"a finite number in {span}" if span else f"a finite number {'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            value = math.nan  # refused below
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = "real"
    return parse


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose error is one line, ``cifar-dist: COMMAND: MESSAGE``, exit 2."""

    def error(self, message: str):
        command = self.prog.removeprefix("cifar-dist").strip()
        self.exit(2, f"cifar-dist: {command + ': ' if command else ''}{message} (see --help)\n")
