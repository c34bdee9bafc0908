"""Types and ranges of every config.json value we read, checked on the raw JSON before anything is built:
-> a list of problems, each naming its key (config.parse_config joins them into one line)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], str | None]  # -> what is wrong, or None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def int_in(lo: int, hi: int = 2**31 - 1) -> Check:
    return lambda v: None if _is_int(v) and lo <= v <= hi else f"must be an integer in [{lo}, {hi}]"


def num_in(lo: float, hi: float, lo_open: bool = False) -> Check:
    def check(v):
        ok = _is_num(v) and (lo < v if lo_open else lo <= v) and v <= hi
        return None if ok else f"must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(repr, choices))}"


def int_list(lo: int = 1, hi: int = 65536) -> Check:
    def check(v):
        ok = isinstance(v, list) and v and all(_is_int(x) and lo <= x <= hi for x in v)
        return None if ok else f"must be a non-empty list of integers in [{lo}, {hi}]"
    return check


def num_list(n: int, lo: float, hi: float, lo_open: bool = False) -> Check:
    def check(v):
        ok = isinstance(v, list) and len(v) == n and all(num_in(lo, hi, lo_open)(x) is None for x in v)
        return None if ok else f"must be a list of {n} numbers in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    return check


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


POS = int_in(1)
EPS = num_in(0.0, 1.0, lo_open=True)

LANGUAGE = {
    "hidden_size": POS, "intermediate_size": POS, "num_attention_heads": POS, "num_hidden_layers": POS,
    "num_key_value_heads": optional(POS), "vocab_size": POS, "max_position_embeddings": int_in(2, 1 << 20),
    "rms_norm_eps": EPS, "rope_theta": num_in(0.0, 1e12, lo_open=True), "head_dim": optional(POS),
}
SIGLIP = {
    "image_size": int_in(1, 4096), "patch_size": POS, "width": POS, "heads": POS, "layers": POS,
    "mlp_ratio": num_in(0.0, 64.0, lo_open=True), "select_layer": int_in(-1024, 1024),
    "select_feature": one_of("patch", "cls_patch", "same"),
    "pixel_mean": optional(num_list(3, 0.0, 1.0)), "pixel_std": optional(num_list(3, 0.0, 10.0, lo_open=True)),
}
GEN_COMMON = {
    "block_out_channels": int_list(), "layers_in_middle": int_in(0, 1024), "hidden_size": POS,
    "elementwise_affine": boolean, "use_bias": boolean, "norm_eps": EPS, "dropout": num_in(0.0, 1.0),
    "use_mid_block": boolean,
}
GEN_ENC = {**GEN_COMMON, "input_channels": POS, "stride": int_in(1, 48), "kernel_size": int_in(1, 48),
           "padding": optional(int_in(0, 48))}
GEN_DEC = {**GEN_COMMON, "in_channels": POS, "out_channels": POS, "upsamples": int_in(0, 6)}

SECTIONS = (("language_config", None, LANGUAGE), ("vision_und_enc_config", "params", SIGLIP),
            ("vision_gen_enc_config", "params", GEN_ENC), ("vision_gen_dec_config", "params", GEN_DEC))


def schema_problems(raw: dict[str, Any]) -> list[str]:
    problems = []
    for section, sub, schema in SECTIONS:
        d = raw.get(section, {})
        where = section
        if isinstance(d, dict) and sub:
            d, where = d.get(sub, {}), f"{section}.{sub}"
        if not isinstance(d, dict):
            problems.append(f"{where} must be an object")
            continue
        for key, check in schema.items():
            if key in d and (msg := check(d[key])):
                problems.append(f"{where}.{key} {msg}, got {d[key]!r}"[:200])
    lang = raw.get("language_config")
    if isinstance(lang, dict) and not problems:
        h, n, kv = lang.get("hidden_size", 4096), lang.get("num_attention_heads", 32), lang.get("num_key_value_heads")
        if lang.get("head_dim") is None and h % n:
            problems.append(f"language_config.hidden_size {h} is not divisible by num_attention_heads {n}")
        if kv is not None and n % kv:
            problems.append(f"language_config.num_attention_heads {n} is not divisible by num_key_value_heads {kv}")
    return problems
