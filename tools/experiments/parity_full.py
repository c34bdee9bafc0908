"""Per-graph parity of a full-size export against the torch modules, one graph at a time: the graph's
torch module gets only its own weights (export/streamed.py: fake_model + materialize), ONNX Runtime runs
the exported file on the spec's seeded dummy inputs, the outputs are compared with the spec's
tolerances, then both are released before the next graph. Prints per graph the worst cosine / max abs /
max rel and the peak RSS (the parity check's own peak, apart from the export's). `janusflow verify` does
more cases but holds the whole FP32 model and every session at once (21.8 GB at full size).

    PYTHONPATH=. python tools/experiments/parity_full.py --model CKPT --artifacts ONNX [--graphs llm,siglip]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from janusflow_trt.export.memory import PeakRSS, release_memory
from janusflow_trt.export.onnx_io import ort_session
from janusflow_trt.export.patches import export_patches
from janusflow_trt.export.specs import build_specs, compare, dummy_inputs
from janusflow_trt.export.streamed import (
    STREAMED_GRAPHS,
    CheckpointTensors,
    fake_model,
    graph_keys,
    materialize,
    used_keys,
)
from janusflow_trt.export.torch_to_onnx import GRAPH_MODULES
from janusflow_trt.janusflow_ref.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--artifacts", required=True)
    p.add_argument("--graphs", default=",".join(sorted(STREAMED_GRAPHS)))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    cfg = load_config(args.model)
    specs, ckpt = build_specs(cfg), CheckpointTensors(Path(args.model), cfg)
    ok = True
    for name in args.graphs.split(","):
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            jf, keys = fake_model(cfg)
            mod = GRAPH_MODULES[name](jf).eval()
            spec = specs[name]
            feeds = dummy_inputs(spec, seed=0)
            inputs = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
            with export_patches():  # the exported forms (same math; see patches.py)
                materialize(mod, used_keys(mod, inputs, graph_keys(mod, keys)), ckpt)
                with torch.no_grad():
                    ref = mod(*inputs)
            ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
            del mod, jf
            got = ort_session(Path(args.artifacts) / f"{name}.onnx", lean=True).run(spec.output_names, feeds)
            rows = [compare(g, r, t.tol) for t, g, r in zip(spec.outputs, got, ref, strict=True)]
            del got, ref
        release_memory()
        worst = {"cosine": min(r["cosine"] for r in rows), "max_abs": max(r["max_abs"] for r in rows),
                 "max_rel": max(r["max_rel"] for r in rows), "ok": all(r["ok"] for r in rows)}
        ok &= worst["ok"]
        print(json.dumps({"graph": name, "outputs": len(rows), **worst, "seconds": round(time.perf_counter() - t0, 1),
                          "peak_rss_mb": rss.peak_mb}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
