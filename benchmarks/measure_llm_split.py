#!/usr/bin/env python
"""llm vs llm_gen per Euler step, and the decode loop over the numpy seam vs the device seam (ORT CPU).
Usage: PYTHONPATH=. python benchmarks/measure_llm_split.py CHECKPOINT EXPORT_DIR (embed + llm exported).
Interleaved repeats in one process; ratios only (shared 2-core machine)."""
import sys, time, json
from pathlib import Path
import numpy as np, torch
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.export.specs import dummy_inputs
from janusflow_trt.runtime.backends import OrtBackend
from janusflow_trt.runtime import chat
from janusflow_trt.runtime.decode import DeviceDecoder
from janusflow_trt.janusflow_ref.sampling import SamplingParams, next_token

ck, art = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config(ck)
b = OrtBackend(art, cfg, threads=2)
spec = b.specs["llm"]
G1 = cfg.num_gen_tokens + 1
feeds = dummy_inputs(spec, seed=0, B=2, S=G1, C=128)
res = {"llm": [], "llm_gen": []}
for g in res:  # warm-up
    b.run(g, feeds)
for rep in range(7):
    for g in res:
        t = time.perf_counter(); b.run(g, feeds); res[g].append(time.perf_counter() - t)
out = {g: round(min(v) * 1e3, 2) for g, v in res.items()}
out["median_ms"] = {g: round(float(np.median(v)) * 1e3, 2) for g, v in res.items()}
# decode: host seam (numpy cache + reference sampler) vs device seam, same prefilled cache state
ctx = 300
emb = np.random.default_rng(0).standard_normal((1, ctx, cfg.hidden)).astype(np.float32)
p = SamplingParams(temperature=0.0, max_new_tokens=64)
def host(n):
    cache = chat.new_cache(cfg, 1, ctx); logits = chat.prefill(b, cache, emb)
    t = time.perf_counter()
    for i in range(n):
        tok = int(next_token(torch.from_numpy(logits), p)[0]); logits = chat.decode_one_token(b, cache, tok)
    return (time.perf_counter() - t) / n
def dev(n):
    cache = chat.new_cache(cfg, 1, ctx); logits = chat.prefill(b, cache, emb)
    from janusflow_trt.runtime.device_sampling import sample_on_device
    d = DeviceDecoder(b, cache, sample_on_device(torch.from_numpy(logits), p))
    t = time.perf_counter()
    for i in range(n):
        int(d.ids[0, 0]); d.step(p)
    return (time.perf_counter() - t) / n
dec = {"host": [], "device": []}
for rep in range(3):
    dec["host"].append(host(48)); dec["device"].append(dev(48))
out["decode_ms_per_token_min"] = {k: round(min(v) * 1e3, 3) for k, v in dec.items()}
out["decode_ms_per_token_all"] = {k: [round(x * 1e3, 3) for x in v] for k, v in dec.items()}
print(json.dumps(out, indent=1))
