"""How long does a joining chat request stall the rows already decoding, with and without chunked
prefill? 7 rows decode (ignore_eos, so none leaves); an 8th joins; every scheduler round is timed
until the joiner samples its first token. Chunk sizes alternate in one process (same machine state).

    python tools/experiments/prefill_stall.py MODEL ARTIFACTS [--chunks 64,100000] [--repeat 3]

A chunk >= the prompt is the unchunked prefill (the SigLIP round, then the whole prompt in one round).
Prints a table and writes docs/results/serve_prefill_stall_small.json."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from janusflow_trt.api import Pipeline
from janusflow_trt.batch import ChatBatch, ChatRequest
from janusflow_trt.janusflow_ref.processor import SYSTEM_PROMPT


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("artifacts")
    ap.add_argument("--chunks", default="64,100000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="docs/results/serve_prefill_stall_small.json")
    a = ap.parse_args()
    pipe = Pipeline.from_pretrained(a.model, backend="ort", artifacts=a.artifacts)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8))
    inputs, params = pipe.chat_request(img, "Describe this image in detail.", 2000, 0.0, 1.0, 42, SYSTEM_PROMPT)
    chunks = [int(c) for c in a.chunks.split(",")]
    res: dict[int, dict[str, list[float]]] = {
        c: {"plain_ms": [], "max_ms": [], "median_ms": [], "total_ms": [], "rounds": []} for c in chunks}
    for _ in range(a.repeat):
        for c in chunks:
            batch = ChatBatch(pipe.engine.backend, pipe.cfg, pipe.processor.eos_id, 8, prefill_chunk=c)
            for _ in range(7):
                batch.submit(ChatRequest(inputs, params, 42, ignore_eos=True))
            batch.step()  # nobody decoding: all 7 admitted in one round
            plain = []
            for _ in range(12):
                t0 = time.perf_counter()
                batch.step()
                plain.append(time.perf_counter() - t0)
            joiner = ChatRequest(inputs, params, 42, ignore_eos=True)
            batch.submit(joiner)
            rounds = []
            while not joiner.tokens:
                t0 = time.perf_counter()
                batch.step()
                rounds.append(time.perf_counter() - t0)
            r = res[c]
            r["plain_ms"].append(statistics.median(plain[2:]) * 1e3)
            r["max_ms"].append(max(rounds) * 1e3)
            r["median_ms"].append(statistics.median(rounds) * 1e3)
            r["total_ms"].append(sum(rounds) * 1e3)
            r["rounds"].append(len(rounds))
    prompt = int(inputs.input_ids.shape[1])
    out = {"prompt_tokens": prompt, "rows_decoding": 7, "repeat": a.repeat,
           "chunks": {str(c): {k: round(statistics.median(v), 2) for k, v in r.items()} for c, r in res.items()}}
    print(f"prompt {prompt} tokens; 7 rows decoding; medians of {a.repeat}")
    print("chunk   | plain round ms | rounds while joining: longest / median ms | rounds to join | join total ms")
    for c, r in out["chunks"].items():
        print(f"{c:>7} | {r['plain_ms']:14.1f} | {r['max_ms']:19.1f} / {r['median_ms']:6.1f}"
              f"              | {r['rounds']:14.0f} | {r['total_ms']:.0f}")
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
