"""ONNX Runtime per-op profile of one Euler step: gen_enc + llm over a cached prefix + gen_dec.

usage: python benchmarks/profile_step.py MODEL_DIR ARTIFACTS_DIR [--precision int8-cpu] [--rows 2] [--prefix 25]
       [--optimized DIR]  (writes each session's optimized graph there: what ORT fused)
       [--decode CONTEXT] (one LLM decode call instead of an Euler step)
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from janusflow_trt.export.manifest import resolve_graph  # noqa: E402
from janusflow_trt.janusflow_ref.config import load_config  # noqa: E402
from janusflow_trt.runtime.backends import read_manifest  # noqa: E402


def step_feeds(cfg, rows: int, prefix: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    h, layers = cfg.hidden, cfg.llm.num_hidden_layers
    hd, nkv = h // cfg.llm.num_attention_heads, cfg.llm.num_key_value_heads
    g, c, new = cfg.latent_grid, cfg.gen_enc.channels, 1 + cfg.num_gen_tokens

    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    past = {f"past_key_values.{i}.{kv}": randn(rows, nkv, prefix, hd) for i in range(layers) for kv in ("key", "value")}
    return {
        "gen_enc": {"z": randn(rows, 4, 48, 48), "t": np.full((rows,), 500, np.float32)},
        "llm": {"inputs_embeds": randn(rows, new, h), "attention_mask": np.ones((rows, prefix + new), np.int64),
                "position_ids": np.tile(np.arange(prefix, prefix + new), (rows, 1)).astype(np.int64), **past},
        "gen_dec": {"hidden": randn(rows, new, h), "skip": randn(rows, c, g, g), "t_emb": randn(rows, h),
                    "z": randn(rows, 4, 48, 48), "cfg_weight": np.array([2.0], np.float32),
                    "dt": np.array([1 / 30], np.float32)},
    }


def decode_feeds(cfg, context: int) -> dict[str, np.ndarray]:
    """One chat decode call of the LLM: 1 token after `context` cached ones."""
    rng = np.random.default_rng(0)
    h, layers = cfg.hidden, cfg.llm.num_hidden_layers
    hd, nkv = h // cfg.llm.num_attention_heads, cfg.llm.num_key_value_heads
    past = {f"past_key_values.{i}.{kv}": rng.standard_normal((1, nkv, context, hd), dtype=np.float32)
            for i in range(layers) for kv in ("key", "value")}
    return {"inputs_embeds": rng.standard_normal((1, 1, h), dtype=np.float32),
            "attention_mask": np.ones((1, context + 1), np.int64),
            "position_ids": np.array([[context]], np.int64), **past}


def profile_graph(path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int, tmp: Path,
                  optimized: Path | None = None) -> tuple[float, collections.Counter, collections.Counter]:
    """-> (wall ms per call, kernel ms per call by op type, node count by op type of the optimized graph)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / path.stem)  # ORT writes its JSON trace here, not in the cwd
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        so.optimized_model_filepath = str(optimized / path.name)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(2):
        sess.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feeds)
    wall = (time.perf_counter() - t0) / runs * 1e3
    kernel: collections.Counter = collections.Counter()
    nodes: collections.Counter = collections.Counter()
    seen = set()
    for e in json.loads(Path(sess.end_profiling()).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            kernel[op] += e["dur"] / (runs + 2) / 1e3
            if e["name"] not in seen:
                seen.add(e["name"])
                nodes[op] += 1
    return wall, kernel, nodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("artifacts")
    ap.add_argument("--precision", default="fp32", help="the exported variant to profile (fp32, int8-cpu, ...)")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--optimized", type=Path, help="write each session's optimized graph to this directory")
    ap.add_argument("--decode", type=int, metavar="CONTEXT", help="profile one LLM decode call instead of a step")
    args = ap.parse_args()
    cfg = load_config(args.model)
    manifest = read_manifest(args.artifacts, cfg)
    if args.optimized:
        args.optimized.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="janusflow-profile-"))
    try:
        graphs = {"llm": decode_feeds(cfg, args.decode)} if args.decode else step_feeds(cfg, args.rows, args.prefix)
        for name, feeds in graphs.items():
            path = Path(args.artifacts) / resolve_graph(manifest, Path(args.artifacts), name, args.precision)["file"]
            wall, kernel, nodes = profile_graph(path, feeds, args.threads, args.runs, tmp, args.optimized)
            total = sum(kernel.values())
            print(f"{name} ({path.name}): wall {wall:.1f} ms, kernels {total:.1f} ms")
            for op, ms in kernel.most_common(12):
                print(f"  {op:26s} x{nodes[op]:<4d} {ms:8.2f} ms  {ms / total * 100:5.1f}%")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
