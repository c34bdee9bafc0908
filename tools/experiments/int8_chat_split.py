"""Where an int8 LLM's chat error comes from: teacher-forced top-1 agreement with FP32 (the quality
command's held-out pairs and metric) for the exported int8 LLM, the same graph with its activations in
float (weight-only INT8) and with its weights in float (activation-only INT8).

usage: python benchmarks/int8_chat_split.py MODEL_DIR ARTIFACTS_DIR [--precision int8-cpu] [--tokens 32]
If weight-only INT8 alone already misses a target, no activation calibration (method, SmoothQuant,
excluded layers) can meet it: only the weights' own rounding is left.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from janusflow_trt.calibration.data import builtin_heldout  # noqa: E402
from janusflow_trt.calibration.record import CalibrationData  # noqa: E402
from janusflow_trt.export.int8_sensitivity import float_weights, one_sided  # noqa: E402
from janusflow_trt.export.manifest import resolve_graph  # noqa: E402
from janusflow_trt.export.quality_metrics import agreement  # noqa: E402
from janusflow_trt.export.specs import build_specs  # noqa: E402
from janusflow_trt.janusflow_ref.config import load_config  # noqa: E402
from janusflow_trt.janusflow_ref.processor import Processor  # noqa: E402
from janusflow_trt.janusflow_ref.sampling import SamplingParams  # noqa: E402
from janusflow_trt.quality import teacher_forced_top1  # noqa: E402
from janusflow_trt.runtime.backends import OrtBackend  # noqa: E402
from janusflow_trt.runtime.chat import chat_tokens  # noqa: E402


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("artifacts")
    ap.add_argument("--precision", default="int8-cpu", choices=("int8", "int8-cpu"))
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    model, art = Path(a.model), Path(a.artifacts)
    cfg, proc = load_config(model), Processor(model)
    b32 = OrtBackend(art, cfg)
    entry = resolve_graph(b32.manifest, art, "llm", "fp32")
    q_entry = resolve_graph(b32.manifest, art, "llm", a.precision)
    q = onnx.load(str(art / q_entry["file"]))
    smoothing = q_entry["recipe"].get("smoothquant")
    w32 = (float_weights(art / entry["file"], build_specs(cfg)["llm"], CalibrationData(art / "calib"), smoothing)
           if isinstance(smoothing, dict) else onnx.load(str(art / entry["file"])))
    variants = {"int8 (exported)": q, "weight-only int8": one_sided(q), "activation-only int8": one_sided(q, w32)}
    backends = {}
    for name, m in variants.items():
        b = OrtBackend(art, cfg, precision=a.precision)
        b.sessions["llm"] = ort.InferenceSession(m.SerializeToString(), b.options, providers=b.providers)
        backends[name] = b
    params = SamplingParams(temperature=0.0, max_new_tokens=a.tokens)
    got: dict[str, list[float]] = {k: [] for k in backends}
    for _, image, question in builtin_heldout().pairs:
        ref = list(chat_tokens(b32, cfg, proc.chat_inputs(image, question), params, proc.eos_id))
        for k, b in backends.items():
            got[k].append(agreement(teacher_forced_top1(b, cfg, proc, image, question, ref), ref))
    pairs = len(got["int8 (exported)"])
    print(f"teacher-forced top-1 vs FP32, {pairs} held-out pairs x {a.tokens} tokens ({a.precision}):")
    for k, v in got.items():
        print(f"  {k:22s} min {min(v):.3f}  mean {np.mean(v):.3f}  per pair {' '.join(f'{x:.2f}' for x in v)}")


if __name__ == "__main__":
    main()
