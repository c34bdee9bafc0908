"""llm vs llm_gen per Euler step, and the decode loop over the numpy seam vs the device seam (ORT CPU).

Usage: PYTHONPATH=. python benchmarks/measure_llm_split.py CHECKPOINT EXPORT_DIR   (embed + llm exported)
Interleaved repeats in one process, best and median: only ratios inside one run mean anything on a
shared machine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from janusflow_trt.export.specs import dummy_inputs
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.janusflow_ref.sampling import SamplingParams, next_token
from janusflow_trt.runtime import chat
from janusflow_trt.runtime.backends import OrtBackend
from janusflow_trt.runtime.decode import DeviceDecoder
from janusflow_trt.runtime.device_sampling import sample_on_device

CONTEXT, TOKENS = 300, 48


def euler_llm_ms(b: OrtBackend, cfg, repeat: int = 7) -> dict:
    feeds = dummy_inputs(b.specs["llm"], seed=0, B=2, S=cfg.num_gen_tokens + 1, C=128)  # one Euler step
    times: dict[str, list[float]] = {"llm": [], "llm_gen": []}
    for g in times:  # warm-up
        b.run(g, feeds)
    for _ in range(repeat):
        for g, t in times.items():
            t0 = time.perf_counter()
            b.run(g, feeds)
            t.append(time.perf_counter() - t0)
    return {"best_ms": {g: round(min(t) * 1e3, 2) for g, t in times.items()},
            "median_ms": {g: round(float(np.median(t)) * 1e3, 2) for g, t in times.items()}}


def decode_ms(b: OrtBackend, cfg, device_seam: bool) -> float:
    p = SamplingParams(temperature=0.0, max_new_tokens=TOKENS)
    emb = np.random.default_rng(0).standard_normal((1, CONTEXT, cfg.hidden)).astype(np.float32)
    cache = chat.new_cache(cfg, 1, CONTEXT)
    logits = chat.prefill(b, cache, emb)
    if device_seam:
        d = DeviceDecoder(b, cache, sample_on_device(torch.from_numpy(logits), p))
        t0 = time.perf_counter()
        for _ in range(TOKENS):
            int(d.ids[0, 0])
            d.step(p)
    else:
        t0 = time.perf_counter()
        for _ in range(TOKENS):
            tok = int(next_token(torch.from_numpy(logits), p)[0])
            logits = chat.decode_one_token(b, cache, tok)
    return (time.perf_counter() - t0) / TOKENS * 1e3


def main() -> None:
    ck, art = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = load_config(ck)
    b = OrtBackend(art, cfg, threads=2)
    out = euler_llm_ms(b, cfg)
    runs: dict[str, list[float]] = {"host": [], "device": []}
    for _ in range(3):
        for k, v in runs.items():
            v.append(round(decode_ms(b, cfg, k == "device"), 3))
    out["decode_ms_per_token"] = {"best": {k: min(v) for k, v in runs.items()}, "all": runs}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
