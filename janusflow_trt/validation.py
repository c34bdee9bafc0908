"""The checks of every Pipeline parameter, shared by the API and the CLI (whose parser has already made
numbers of the strings): types and ranges before any work, one InputError line each, named as the
CLI names them. Ranges live here; SamplingParams and check_generation_args keep their own checks as the
invariants of the layer below."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

from .errors import InputError

MAX_SEED = 2**63 - 1  # torch.manual_seed's range
MAX_STEPS = 1000


def integer(name: str, v, lo: int, hi: int) -> int:
    """An int (not a bool, not a float) in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
    n = int(v)
    if not lo <= n <= hi:
        raise InputError(f"{name} must be in [{lo}, {hi}], got {n}")
    return n


def number(name: str, v, lo: float, hi: float) -> float:
    """A finite real number (not a bool, not a string) in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise InputError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    try:
        x = float(v)
    except OverflowError:  # an int beyond float's range
        x = math.inf
    if not math.isfinite(x) or not lo <= x <= hi:
        raise InputError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {v}")
    return x


def seed(v) -> int:
    return integer("--seed", v, 0, MAX_SEED)


def text(name: str, v, special: Iterable[str] = ()) -> str:
    """A non-empty str without the tokenizer's special tokens (they would be read as markup: refused,
    not taken as text)."""
    if not isinstance(v, str):
        raise InputError(f"{name} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise InputError(f"{name} is empty")
    for tok in special:
        if tok in v:
            raise InputError(f"{name} contains the special token {tok!r}; remove it")
    return v


def callback(v) -> None:
    if v is not None and not callable(v):
        raise InputError(f"callback must be callable (step, latents) or None, got {type(v).__name__}")


def chat_args(max_new_tokens, temperature, top_p, seed_) -> None:
    integer("--max-new-tokens", max_new_tokens, 1, 1 << 20)
    number("--temperature", temperature, 0.0, 100.0)
    number("--top-p", top_p, 0.0, 1.0)
    seed(seed_)


def generate_args(num_images, steps, cfg_weight, seed_, callback_) -> None:
    integer("--num-images", num_images, 1, 1 << 16)
    integer("--steps", steps, 1, MAX_STEPS)
    number("--cfg", cfg_weight, -100.0, 100.0)
    seed(seed_)
    callback(callback_)


def threads(v, max_threads: int) -> None:
    if v is not None:
        integer("threads", v, 1, max_threads)
