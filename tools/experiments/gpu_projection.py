"""Projected H100 floors at full size: the work bench's floor code counts (benchmarks/floors.py) over
NVIDIA's datasheet peaks. PROJECTIONS, not measurements: nothing here has run on a GPU.

python -m benchmarks.gpu_projection [--prefix N]
"""

from __future__ import annotations

import argparse

from janusflow_trt.benchmarks import floors
from janusflow_trt.janusflow_ref.config import JanusFlowConfig, parse_config
from janusflow_trt.tiny import model_config

# H100 SXM5 80 GB datasheet: dense FP16/BF16 tensor-core peak (without sparsity) and HBM3 bandwidth
H100_FP16_TFLOPS = 989.4
H100_HBM_TBS = 3.35
FP16 = 2  # bytes per weight / cache element


def projection(cfg: JanusFlowConfig, prefix: int, contexts: tuple[int, ...] = (64, 256, 1024)) -> dict:
    rows = 2  # one image: cond + uncond
    flop = floors.euler_step_flops(cfg, rows, prefix, recompute_prefix=False)
    official = floors.euler_step_flops(cfg, rows, prefix, recompute_prefix=True)
    ms = {k: v / (H100_FP16_TFLOPS * 1e12) * 1e3 for k, v in flop.items()}
    llm_weights = cfg.llm.num_hidden_layers * floors.llm_layer_params(cfg) * FP16  # no LM head in an Euler step
    return {
        "euler_step_gflop": {k: v / 1e9 for k, v in flop.items()},
        "euler_step_flop_floor_ms": ms,
        "euler_step_llm_weight_read_floor_ms": llm_weights / (H100_HBM_TBS * 1e12) * 1e3,
        "official_step_gflop": sum(official.values()) / 1e9,
        "decode_bandwidth_floor_ms": {c: floors.decode_bytes(cfg, c, FP16) / (H100_HBM_TBS * 1e12) * 1e3
                                      for c in contexts},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", type=int, default=40, help="prompt prefix tokens cached before the Euler loop")
    a = ap.parse_args()
    p = projection(parse_config(model_config("full", 102400)), a.prefix)
    print(f"PROJECTION (H100 SXM datasheet: {H100_FP16_TFLOPS} TFLOP/s FP16 dense, {H100_HBM_TBS} TB/s), full size, "
          f"CFG batch 2, prefix {a.prefix}")
    for k, v in p["euler_step_flop_floor_ms"].items():
        print(f"  Euler step {k:4}: {p['euler_step_gflop'][k]:8.1f} GFLOP -> FLOP floor {v:7.3f} ms")
    print(f"  Euler step total FLOP floor {sum(p['euler_step_flop_floor_ms'].values()):.3f} ms; LLM weight read "
          f"floor {p['euler_step_llm_weight_read_floor_ms']:.3f} ms; x30 steps = "
          f"{30 * max(sum(p['euler_step_flop_floor_ms'].values()), p['euler_step_llm_weight_read_floor_ms']):.1f} ms")
    print(f"  official loop (prefix recomputed): {p['official_step_gflop']:.1f} GFLOP per step")
    for c, v in p["decode_bandwidth_floor_ms"].items():
        print(f"  decode @ context {c:5}: bandwidth floor {v:.3f} ms/token (FP16 weights + LM head + KV)")


if __name__ == "__main__":
    main()
