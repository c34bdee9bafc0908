"""Our exported attention (export/graphs.py: _attend) against ONNX Runtime's fused attention kernels, on the CPU.

usage: python benchmarks/attention_kernels.py [--heads 8] [--head-dim 64] [--rows 2] [--new 577] [--past 25]
       [--rounds 15] [--threads 2]

Each variant computes softmax(q k^T * scale + mask) v over [cached | new] keys with the mask an Euler step
uses (cache slots valid, causal over the new tokens) and returns [rows, new, heads * head_dim]:
- `ours`: `_attend` itself, exported by torch.onnx with identity projections (what every LLM layer runs,
  including its RoPE, which is cos=1 / sin=0 here);
- the fused variants do the same RoPE, concatenate [cache | new] keys and values, then call one kernel:
  `mha`: com.microsoft MultiHeadAttention with an additive attention_bias; `onnx_attention`: the opset-23
  Attention op with the same float mask; `*_causal`: the kernels' own causal flag instead of a mask (the
  JanusFlow step needs the cache-slot mask as well, so these only bound what a flag could give);
- `*_nomask`: no mask at all, which no JanusFlow call can use: what the fused kernels do unhindered.
Times are the minimum over rounds, all variants round-robin in one process, intra-op spinning off as in
the product's sessions. Outputs are compared to `ours` (max abs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from janusflow_trt.export.graphs import NEG, _attend  # noqa: E402


class _IdentityAttention(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.q_proj = self.k_proj = self.v_proj = self.o_proj = nn.Identity()
        self.head_dim, self.num_key_value_groups, self.scaling = head_dim, 1, head_dim**-0.5


class _Core(nn.Module):
    """_attend with identity projections: x [B,S,N*hd] is q, k and v at once."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.self_attn = _IdentityAttention(head_dim)

    def forward(self, x, cos, sin, past_k, past_v, bias_past, bias_new, keep_past):
        return _attend(self, x, cos, sin, past_k, past_v, bias_past, bias_new, keep_past)[0]


class _FusedCore(nn.Module):
    """The same RoPE and cache concatenation, then one fused kernel: `mha` (com.microsoft MultiHeadAttention,
    query [B,S,N*hd], key/value [B,N,T,hd], attention_bias [B,1,S,T]) or `onnx_attention` (opset 23)."""

    def __init__(self, op: str, mask: str, heads: int, head_dim: int):
        super().__init__()
        self.op, self.mask, self.heads, self.hd = op, mask, heads, head_dim

    def forward(self, x, cos, sin, past_k, past_v, mask):
        b, s, _ = x.shape
        q = k = v = x.view(b, s, self.heads, self.hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        bias = mask if self.mask == "bias" else None
        if self.op == "onnx_attention":
            out = torch.onnx.ops.attention(q, k, v, bias, is_causal=self.mask == "causal", scale=self.hd**-0.5)[0]
            return out.transpose(1, 2).reshape(b, s, -1)
        q3 = q.transpose(1, 2).reshape(b, s, -1)
        return torch.onnx.ops.symbolic(
            "com.microsoft::MultiHeadAttention",
            [q3, k, v, None, None, bias],
            {"num_heads": self.heads, "scale": self.hd**-0.5, "unidirectional": int(self.mask == "causal")},
            dtype=q3.dtype,
            shape=q3.shape,
            version=1,
        )


def _feeds(rows: int, heads: int, hd: int, new: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    causal = np.broadcast_to(
        np.where(np.tril(np.ones((new, new), bool)), 0.0, NEG).astype(np.float32), (rows, 1, new, new)
    )
    return {
        "x": rng.standard_normal((rows, new, heads * hd), dtype=np.float32),
        "cos": np.ones((rows, new, hd), np.float32),
        "sin": np.zeros((rows, new, hd), np.float32),
        "past_k": rng.standard_normal((rows, heads, past, hd), dtype=np.float32),
        "past_v": rng.standard_normal((rows, heads, past, hd), dtype=np.float32),
        "bias_past": np.zeros((rows, 1, 1, past), np.float32),
        "bias_new": causal.copy(),
        "keep_past": np.ones((rows, 1, 1, past), np.float32),
        "mask": np.concatenate([np.zeros((rows, 1, new, past), np.float32), causal], 3),  # one [B,1,S,T] bias
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--new", type=int, default=577)
    ap.add_argument("--past", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    feeds = _feeds(a.rows, a.heads, a.head_dim, a.new, a.past)
    ours_in = ["x", "cos", "sin", "past_k", "past_v", "bias_past", "bias_new", "keep_past"]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"ours": Path(tmp, "ours.onnx")}
        torch.onnx.export(
            _Core(a.head_dim),
            tuple(torch.from_numpy(feeds[n]) for n in ours_in),
            paths["ours"],
            input_names=ours_in,
            output_names=["out"],
            dynamo=True,
            verbose=False,
        )
        fused_in = ["x", "cos", "sin", "past_k", "past_v", "mask"]
        for op in ("mha", "onnx_attention"):
            for mask in ("bias", "causal", "nomask"):
                name = op if mask == "bias" else f"{op}_{mask}"
                paths[name] = Path(tmp, f"{name}.onnx")
                torch.onnx.export(
                    _FusedCore(op, mask, a.heads, a.head_dim),
                    tuple(torch.from_numpy(feeds[n]) for n in fused_in),
                    paths[name],
                    input_names=fused_in,
                    output_names=["out"],
                    dynamo=True,
                    verbose=False,
                    opset_version=23 if op == "onnx_attention" else 18,
                )
        sessions = {n: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for n, p in paths.items()}
    runs = {n: (s, {i.name: feeds[i.name] for i in s.get_inputs()}) for n, s in sessions.items()}
    ref = runs["ours"][0].run(None, runs["ours"][1])[0]
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(a.rounds):
        for n, (s, f) in runs.items():
            t0 = time.perf_counter()
            s.run(None, f)
            best[n] = min(best[n], time.perf_counter() - t0)
    print(
        f"rows {a.rows}, heads {a.heads}, head_dim {a.head_dim}, {a.past} cached + {a.new} new, "
        f"{a.threads} threads, min over {a.rounds} rounds; onnxruntime {ort.__version__}"
    )
    for n, (s, f) in runs.items():
        diff = float(np.abs(s.run(None, f)[0] - ref).max())
        note = "" if n.endswith("nomask") or n.endswith("causal") else f"  max abs vs ours {diff:.1e}"
        print(f"{n:24s} {best[n] * 1e3:8.2f} ms  {best[n] / best['ours']:5.2f}x ours{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
