"""ONNX Runtime per-op profile of one Euler step: gen_enc + llm over a cached prefix + gen_dec.

usage: python benchmarks/profile_step.py MODEL_DIR ARTIFACTS_DIR [--rows 2] [--prefix 25]
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

from janusflow_trt.janusflow_ref.config import load_config  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("artifacts")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(args.model)
    kernel: collections.Counter = collections.Counter()
    wall = {}
    runs = 5
    tmp = tempfile.mkdtemp(prefix="janusflow-profile-")
    for name, feeds in step_feeds(cfg, args.rows, args.prefix).items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / name)  # ORT writes its JSON trace here, not in the cwd
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(Path(args.artifacts) / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
        for _ in range(2):
            sess.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feeds)
        wall[name] = (time.perf_counter() - t0) / runs * 1e3
        for e in json.loads(Path(sess.end_profiling()).read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                kernel[(name, e["args"]["op_name"])] += e["dur"] / (runs + 2) / 1e3
    shutil.rmtree(tmp, ignore_errors=True)
    print("wall ms per graph:", {k: round(v, 1) for k, v in wall.items()})
    total = sum(kernel.values())
    for (graph, op), ms in kernel.most_common(16):
        print(f"{graph:8s} {op:20s} {ms:7.2f} ms  {ms / total * 100:5.1f}%")


if __name__ == "__main__":
    main()
