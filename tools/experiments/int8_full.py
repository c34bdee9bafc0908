"""Peak memory of one graph's INT8 derivation (export/int8.py: derive_int8) at full size, without a whole
export: the graph's FP32 file from an existing export directory, a small synthetic calibration set (the
spec's seeded dummy inputs at a few short prefill / decode shapes; ranges from them are meaningless, the
memory and the code path are the export's), each phase of derive_int8 timed with its peak RSS.

    flock /tmp/jf-measure.lock /usr/bin/time -v env PYTHONPATH=. python tools/experiments/int8_full.py \
        --model CKPT --artifacts ONNX --out /tmp/int8 [--graph llm] [--precision int8-cpu|int8|fp16] \
        [--samples 2] [--reference]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from janusflow_trt.export import fp16, int8
from janusflow_trt.export.memory import PeakRSS, max_rss_mb
from janusflow_trt.export.specs import build_specs, dummy_inputs
from janusflow_trt.janusflow_ref.config import load_config

FP16_PHASES = ("measure", "load_typed", "convert", "stream_weights", "calibration_check")
PHASES = ("named_streamed", "load_smoothed", "tensor_ranges", "quantize_static", "float_consumers_read_float")


class SyntheticCalib:
    """The duck type derive_int8 reads (calibration/record.py: CalibrationData): `n` samples of one graph,
    alternating a short prefill (S=16, empty past) and a decode step (S=1, past 16)."""

    def __init__(self, spec, n: int, path: Path):
        self.spec, self.n, self.path, self.sha256 = spec, n, path, "synthetic"

    def _sizes(self, k: int) -> dict[str, int]:
        if self.spec.name != "llm":
            return {}
        return {"S": 16, "C": 1, "M": 17} if k % 2 == 0 else {"S": 1, "C": 16, "M": 17}

    def select(self, graph, limit=None):
        return [("synthetic", {"file": str(k)}) for k in range(min(self.n, limit or self.n))]

    def count(self, graph):
        return self.n

    def kinds(self, graph, limit=None):
        return {"synthetic": len(self.select(graph, limit))}

    def samples(self, graph, limit=None):
        for k in range(len(self.select(graph, limit))):
            yield dummy_inputs(self.spec, seed=k, **self._sizes(k))


def timed(name: str, fn, log: dict):
    def run(*a, **kw):
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            r = fn(*a, **kw)
        log[name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": rss.peak_mb,
                     "start_rss_mb": rss.start_mb}
        print(f"  {name}: {log[name]}", file=sys.stderr, flush=True)
        return r
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the checkpoint the export came from (its config only)")
    p.add_argument("--artifacts", required=True, help="an FP32 export directory (read only)")
    p.add_argument("--out", required=True, help="a new directory for the int8 graph")
    p.add_argument("--graph", default="llm")
    p.add_argument("--precision", default="int8-cpu")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--reference", action="store_true", help="derive_int8(streamed=False): the loaded-model path")
    args = p.parse_args(argv)
    src = Path(args.artifacts)
    spec = build_specs(load_config(args.model))[args.graph]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    log: dict = {}
    module, phases = (fp16, FP16_PHASES) if args.precision == "fp16" else (int8, PHASES)
    for name in phases:
        setattr(module, name, timed(name, getattr(module, name), log))
    calib, dst = SyntheticCalib(spec, args.samples, out), out / f"{args.graph}.{args.precision}.onnx"
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        if args.precision == "fp16":
            r = fp16.derive_fp16(src / f"{args.graph}.onnx", spec, calib, dst, True, check=args.samples)
        else:
            r = int8.derive_int8(src / f"{args.graph}.onnx", spec, calib, dst, args.precision, big=True,
                                 streamed=not args.reference)
    log["derive"] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": rss.peak_mb}
    log["process"] = max_rss_mb()
    if args.precision != "fp16":
        log["quantized_nodes"] = r["recipe"]["quantized_nodes"]
    print(json.dumps(log, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
