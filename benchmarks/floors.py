"""This machine's physical floors, measured in the same run as the benchmark, and the work each
stage must do (FLOPs / bytes) counted from the config."""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.helper import tensor_dtype_to_np_dtype

from janusflow_trt.janusflow_ref.config import LATENT_CHANNELS, JanusFlowConfig

NOISY_NOISE = 0.25  # a size whose median repeat falls this far below its best ran beside other work
NOISY_CPU_SHARE = 0.8  # the probe's threads got less than this share of their cores: other work ran on them


def _times(fn, repeat: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):  # page-in, thread pool start, oneDNN's primitive for this shape
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


def _measure(sizes, run_size, threads: int | None = None) -> dict:
    """run_size(size) -> that size's rates; the probe over every size, with the CPU share its threads got."""
    threads = threads or torch.get_num_threads()
    c0, t0 = _cpu_seconds(), time.perf_counter()
    rates = {str(n): run_size(n) for n in sizes}
    share = (_cpu_seconds() - c0) / ((time.perf_counter() - t0) * threads)
    return _probe(rates, share)


def _probe(rates: dict[str, list[float]], cpu_share: float) -> dict:
    """Best rate over sizes and repeats (the STREAM convention: the best run is the machine's capability,
    slower runs are interference), and two signs of interference, each with its threshold:
    - noise: per size, how far the median repeat falls below that size's best, the largest over sizes.
      Within a size only: sizes differ by design (on this Zen 5 a quiet BF16 512^3 product runs at about
      half the 2048^3 rate), which the former spread over all sizes counted as noise on every run;
    - cpu_share: the CPU time the process got over wall time x threads (~1 when the cores are its own; a
      machine busy for the whole probe lowers every repeat alike, which no spread shows).
    noisy: either past its threshold (NOISY_NOISE, NOISY_CPU_SHARE)."""
    best = {k: max(v) for k, v in rates.items()}
    noise = max((best[k] - statistics.median(v)) / best[k] for k, v in rates.items())
    everything = [x for v in rates.values() for x in v]
    return {"best": max(best.values()), "per_size_best": best, "median": statistics.median(everything),
            "noise": noise, "cpu_share": cpu_share, "noisy": noise > NOISY_NOISE or cpu_share < NOISY_CPU_SHARE}


def gemm_probe(sizes=(512, 1024, 2048), repeat: int = 7, dtype: torch.dtype = torch.float32) -> dict:
    """GEMM rate, GFLOP/s: torch.mm in `dtype` (FP32; BF16: oneDNN's kernels, AMX or AVX-512 BF16 where
    the CPU has them) at several sizes on all intra-op threads, `repeat` times each after warm-up."""
    def run(n: int) -> list[float]:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        return [2 * n**3 / t / 1e9 for t in _times(lambda: torch.mm(a, b), repeat)]

    return _measure(sizes, run)


def read_probe(mbytes=(128, 256, 512), repeat: int = 7) -> dict:
    """Memory read bandwidth, GB/s: a sum over buffers far beyond the last-level cache, all threads,
    `repeat` times each after warm-up (a read-only kernel, like a decode step's pass over the weights)."""
    def run(mb: int) -> list[float]:
        x = torch.ones(mb * 2**20 // 4)
        return [x.numel() * 4 / t / 1e9 for t in _times(lambda: x.sum(), repeat)]

    return _measure(mbytes, run)


def llm_layer_params(cfg: JanusFlowConfig) -> int:
    llm, h = cfg.llm, cfg.hidden
    hd = h // llm.num_attention_heads
    kv = llm.num_key_value_heads * hd
    return 2 * h * h + 2 * h * kv + 3 * h * llm.intermediate_size


def llm_flops(cfg: JanusFlowConfig, rows: int, new: int, past: int, logits: bool = False) -> float:
    """Matmul FLOPs of one LLM call: rows x new tokens attending to past + new keys."""
    h, layers = cfg.hidden, cfg.llm.num_hidden_layers
    dense = 2 * llm_layer_params(cfg) * rows * new * layers
    attn = 2 * 2 * rows * new * (past + new) * h * layers
    head = 2 * h * cfg.llm.vocab_size * rows if logits else 0
    return dense + attn + head


def convnext_flops(c: int, pixels: int, blocks: int, hidden: int) -> float:
    return blocks * (pixels * (2 * 49 * c + 2 * 2 * c * 4 * c) + 2 * hidden * 2 * c)


def gen_enc_flops(cfg: JanusFlowConfig, rows: int) -> float:
    e, h, g = cfg.gen_enc, cfg.hidden, cfg.num_gen_tokens
    c = e.channels
    conv = 2 * LATENT_CHANNELS * e.kernel_size**2 * c * g
    temb = 2 * (e.block_out_channels[0] * h + h * h)
    return rows * (conv + temb + convnext_flops(c, g, e.layers_in_middle, h) + 2 * c * h * g)


def gen_dec_flops(cfg: JanusFlowConfig, rows: int) -> float:
    d, h, g = cfg.gen_dec, cfg.hidden, cfg.num_gen_tokens
    c2 = d.in_channels + d.block_out_channels[-1]
    unpatch = 2 * c2 * LATENT_CHANNELS * 4 * g
    return rows * (2 * h * d.in_channels * g + convnext_flops(c2, g, d.layers_in_middle, h) + unpatch)


def euler_step_flops(cfg: JanusFlowConfig, rows: int, prefix: int, recompute_prefix: bool) -> dict[str, float]:
    """FLOPs per Euler step; recompute_prefix=True is the official loop (prompt re-run every step)."""
    g1 = 1 + cfg.num_gen_tokens
    llm = (llm_flops(cfg, rows, prefix + g1, 0) if recompute_prefix else llm_flops(cfg, rows, g1, prefix))
    return {"enc": gen_enc_flops(cfg, rows), "llm": llm, "dec": gen_dec_flops(cfg, rows)}


def decode_bytes(cfg: JanusFlowConfig, context: int, dtype_bytes: int = 4, weight_bytes: float | None = None,
                 kv_bytes: int | None = None) -> float:
    """Bytes one decode token must read: every LLM weight, the LM head and the K/V of the context.
    weight_bytes: those of the graph actually run (graph_weight_bytes: INT8 / FP16 / FP32 as stored);
    otherwise the parameter count at dtype_bytes. kv_bytes: the cache's element size (default dtype_bytes)."""
    h, layers = cfg.hidden, cfg.llm.num_hidden_layers
    kv = cfg.llm.num_key_value_heads * (h // cfg.llm.num_attention_heads)
    if weight_bytes is None:
        weight_bytes = dtype_bytes * (layers * llm_layer_params(cfg) + h * cfg.llm.vocab_size)
    return weight_bytes + (kv_bytes or dtype_bytes) * 2 * layers * context * kv


def graph_weight_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of one ONNX graph file's constants as stored (an INT8 weight 1 byte per element plus its
    scales and zero points, FP16 2, FP32 4), read from the tensor headers only (external data is not
    loaded). Tables read only by Gather (a token embedding: one row per token) are counted apart.
    -> {'weights': bytes every call reads, 'gathered': bytes of Gather-only tables, 'by_dtype': ...}."""
    g = onnx.load(str(path), load_external_data=False).graph
    tensors = list(g.initializer) + [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute
                                     if a.name == "value"]
    readers: dict[str, set[str]] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, set()).add(n.op_type)
    out: dict = {"weights": 0, "gathered": 0, "by_dtype": {}}
    for t in tensors:
        dt = np.dtype(tensor_dtype_to_np_dtype(t.data_type))
        nbytes = int(np.prod(t.dims, dtype=np.int64)) * dt.itemsize
        if readers.get(t.name) == {"Gather"}:
            out["gathered"] += nbytes
            continue
        out["weights"] += nbytes
        out["by_dtype"][dt.name] = out["by_dtype"].get(dt.name, 0) + nbytes
    return out
