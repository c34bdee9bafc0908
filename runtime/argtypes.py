"""argparse types shared by every subcommand: a bad number is refused by the parser in one line."""

from __future__ import annotations

import argparse
import math
import os


def finite(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {s!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {s}")
        return v
    parse.__name__ = kind.__name__
    return parse


def int_range(lo: int, hi: int):
    """An int in [lo, hi] (the parser names the flag in its message)."""
    def parse(s: str) -> int:
        v = finite(int)(s)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {v}")
        return v
    parse.__name__ = "int"
    return parse


def seed(s: str) -> int:
    v = finite(int)(s)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2^63), got {s}")
    return v


MAX_THREADS = max(os.cpu_count() or 1, 1)  # more intra-op threads than logical CPUs only oversubscribes


def threads(s: str) -> int:
    v = finite(int)(s)
    if not 1 <= v <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_THREADS}] (this machine's logical CPUs), got {v}")
    return v
