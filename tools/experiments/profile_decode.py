"""Where a decode step's time goes beyond its bandwidth floor, on ONNX Runtime over the runtime's own
decode path: the embed call, the LLM call (with the cache's empty bucket slots and without), the host
work (cache write, argmax), and inside the LLM call the LM head and attention (ORT per-op profile).

usage: python benchmarks/profile_decode.py MODEL_DIR ARTIFACTS_DIR [--context 700] [--tokens 40]
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from janusflow_trt.benchmarks import floors  # noqa: E402
from janusflow_trt.janusflow_ref.config import load_config  # noqa: E402
from janusflow_trt.runtime.backends import OrtBackend  # noqa: E402
from janusflow_trt.runtime.chat import decode_one_token, llm_step, new_cache, prefill  # noqa: E402


def median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def filled_cache(backend, cfg, context: int, exact: bool):
    cache = new_cache(cfg, 1, context + 1, exact=exact)
    emb = (np.random.default_rng(0).standard_normal((1, context, cfg.hidden)) * 0.5).astype(np.float32)
    prefill(backend, cache, emb)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("artifacts")
    ap.add_argument("--context", type=int, default=700)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    cfg = load_config(args.model)
    b = OrtBackend(args.artifacts, cfg, args.threads)
    bucketed = filled_cache(b, cfg, args.context, exact=False)
    exact = filled_cache(b, cfg, args.context, exact=True)
    emb = b.run("embed", {"input_ids": np.array([[1]], np.int64)})["inputs_embeds"].copy()
    one = np.ones((1, 1), np.int64)
    out = llm_step(b, bucketed, emb, one, write=False)
    logits = out["logits"].copy()
    res = {
        "context": args.context, "bucket_capacity": bucketed.capacity,
        "embed_ms": median_ms(lambda: b.run("embed", {"input_ids": np.array([[1]], np.int64)}), args.tokens),
        "llm_ms_bucketed": median_ms(lambda: llm_step(b, bucketed, emb, one, write=False), args.tokens),
        "llm_ms_exact": median_ms(lambda: llm_step(b, exact, emb, one, write=False), args.tokens),
        "argmax_ms": median_ms(lambda: int(logits[0].argmax()), args.tokens),
    }
    present = {n: out[n].copy() for n in bucketed.present_names}

    def write():  # the cache write of one token, undone so the length stays put
        bucketed.append(present, one)
        bucketed.length -= 1
        bucketed.valid[:, bucketed.length] = 0

    res["cache_write_ms"] = median_ms(write, args.tokens)
    steps = []
    tok = 1
    for _ in range(args.tokens):
        t0 = time.perf_counter()
        tok = int(decode_one_token(b, bucketed, tok)[0].argmax())
        steps.append(time.perf_counter() - t0)
    res["step_ms"] = statistics.median(steps) * 1e3
    res["llm_ops_ms"] = op_profile(args.artifacts, b, bucketed, emb, one, args.tokens)
    read = floors.read_probe()
    res["read_gbs"], res["read_spread"] = read["best"], read["spread"]
    res["floor_ms"] = floors.decode_bytes(cfg, args.context) / (read["best"] * 1e9) * 1e3
    head_bytes = 4 * cfg.hidden * cfg.llm.vocab_size
    res["lm_head_floor_ms"] = head_bytes / (read["best"] * 1e9) * 1e3
    res["step_vs_floor"] = res["step_ms"] / res["floor_ms"]
    print(json.dumps(res, indent=1))


def op_profile(artifacts, b, cache, emb, one, runs: int) -> dict[str, float]:
    """Per-node kernel ms of one LLM decode call, grouped: lm_head, attention (MatMul on K/V, softmax),
    dense (other MatMul), other."""
    import onnx
    import onnxruntime as ort

    path = Path(artifacts) / b.manifest["graphs"]["llm"]["file"]
    graph = onnx.load(str(path), load_external_data=False).graph
    head = next(n.name for n in graph.node if "logits" in n.output).lower()  # the LM head's Gemm/MatMul
    tmp = tempfile.mkdtemp(prefix="janusflow-profile-")
    so = ort.SessionOptions()
    so.intra_op_num_threads = b.options.intra_op_num_threads
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tmp) / "llm")
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    pos = np.array([[cache.length]], np.int64)
    feeds = {"inputs_embeds": emb, "attention_mask": cache.mask(one), "position_ids": pos, **cache.past_feeds()}
    for _ in range(runs):
        sess.run(None, feeds)
    groups: collections.Counter = collections.Counter()
    for e in json.loads(Path(sess.end_profiling()).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name, op = e["name"].lower(), e["args"]["op_name"]
            if name.startswith(head + "_"):
                g = "lm_head"
            elif op in ("Softmax", "Exp", "ReduceMax", "ReduceSum") or "attn" in name or "attention" in name:
                g = "attention"
            elif op in ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits"):
                g = "dense"
            else:
                g = "other"
            groups[g] += e["dur"] / runs / 1e3
    shutil.rmtree(tmp, ignore_errors=True)
    return dict(groups)


if __name__ == "__main__":
    main()
