"""Is export/fp16.py's to_float16 the float16 converter's convert_np_to_float16, bytes for bytes, and how
much faster, on real full-size weights (the LLM's layer 0 of a `make-tiny --size full` checkpoint, read as
FP32)? Prints both times, their ratio and the extrapolation to the LLM's 1.35 G weights.

    PYTHONPATH=. python tools/experiments/fp16_convert_bench.py [CKPT]
"""

from __future__ import annotations

import sys
import time

from onnxruntime.transformers.float16 import convert_np_to_float16
from safetensors import safe_open

from janusflow_trt.export.fp16 import to_float16


def main(ckpt: str = "/work/wt/full_ckpt") -> None:
    with safe_open(f"{ckpt}/model.safetensors", "pt") as f:
        keys = [k for k in f.keys() if "language_model.model.layers.0." in k and k.endswith("weight")]
        arrs = [f.get_tensor(k).float().numpy() for k in keys]
    n = sum(a.size for a in arrs)
    t = time.perf_counter()
    ref = [convert_np_to_float16(a) for a in arrs]
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    new = [to_float16(a) for a in arrs]
    t_new = time.perf_counter() - t
    same = all(x.tobytes() == y.tobytes() for x, y in zip(ref, new, strict=True))
    print(f"LLM layer 0: {n / 1e6:.1f} M weights; convert_np_to_float16 {t_ref:.2f} s, to_float16 {t_new:.2f} s "
          f"({t_ref / t_new:.1f}x); over the LLM's 1.35 G weights ~{t_ref * 1350e6 / n:.0f} s vs "
          f"~{t_new * 1350e6 / n:.0f} s; bytes {'equal' if same else 'DIFFER'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
