"""Issue 23's chat targets against what the decode call itself allows: ONNX Runtime's LLM call for one new
token per row (the server's batched decode step) at 1, 2, 4 and 8 rows over the same cache capacity, and
one chat prefill (SigLIP + the prompt with its 576 image tokens, one request), timed alternately in one
process (the machine's drift falls on every size). From them, the best a continuous-batching server could
reach with no overhead at all, for `ANSWER`-token answers:
- output tokens/s at 8 clients vs 1 with prefills free: 8 x t(1) / t(8); with each request's prefill paid
  once: 8 (P + A t(1)) / (8 P + A t(8)) (the bench's fixed-length answers keep 8 clients in step: 8
  prefills, then A batched steps).
Writes docs/results/serve_chat_ceiling.json.

    PYTHONPATH=. python tools/experiments/chat_batch_ceiling.py MODEL ARTIFACTS [--capacity 1024] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from janusflow_trt.api import Pipeline
from janusflow_trt.export.specs import dummy_inputs
from janusflow_trt.janusflow_ref.processor import SYSTEM_PROMPT
from janusflow_trt.runtime.chat import chat_prefill

ANSWER = 64
ROWS = (1, 2, 4, 8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("artifacts")
    ap.add_argument("--capacity", type=int, default=1024)  # the server's static cache (C of the llm spec)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default="docs/results/serve_chat_ceiling.json")
    a = ap.parse_args()
    pipe = Pipeline.from_pretrained(a.model, backend="ort", artifacts=a.artifacts)
    b, cfg = pipe.engine.backend, pipe.cfg
    spec = b.specs["llm"]
    feeds = {r: {k: torch.from_numpy(v) for k, v in dummy_inputs(spec, 0, B=r, S=1, C=a.capacity,
                                                                  M=a.capacity + 1).items()} for r in ROWS}
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 384, 3), dtype=np.uint8))
    inputs, _ = pipe.chat_request(img, "Describe this image in detail.", 64, 0.0, 1.0, 42, SYSTEM_PROMPT)

    def prefill() -> None:
        chat_prefill(b, cfg, inputs, capacity=ANSWER)

    times: dict[str, list[float]] = {**{f"decode@{r}": [] for r in ROWS}, "prefill": []}
    jobs = {**{f"decode@{r}": (lambda r=r: b.run("llm", feeds[r])) for r in ROWS}, "prefill": prefill}
    for k in range(a.repeat + 2):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            if k >= 2:  # two warm-up passes
                times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    t1, t8, p = ms["decode@1"], ms["decode@8"], ms["prefill"]
    res = {"command": "python tools/experiments/chat_batch_ceiling.py " + f"{a.model} {a.artifacts} --capacity "
                      f"{a.capacity} --repeat {a.repeat}",
           "median_ms": {k: round(v, 3) for k, v in ms.items()},
           "ceiling": {"tok_s_8_vs_1_prefill_free": round(8 * t1 / t8, 3),
                       "tok_s_8_vs_1_with_prefill": round(8 * (p + ANSWER * t1) / (8 * p + ANSWER * t8), 3)},
           "answer_tokens": ANSWER, "threads": b.options.intra_op_num_threads}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
