"""Per-node INT8 sensitivity of one graph: each MatMul/Gemm/Conv quantized alone (every other node
excluded), run on the first calibration samples, compared with FP32: the worst output cosine. The
nodes whose lone quantization costs the most are the ones to keep float. Also each node's activation
outlier ratio (absmax / rms of its float input over the same samples): per-tensor INT8 spends its 255
levels on the absmax, so a ratio of 100 leaves the bulk of the values a few levels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .int8 import QUANT_OPS, derive_int8


def _activation_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """node -> its first non-initializer input (the activation per-tensor INT8 would quantize)."""
    inits = {t.name for t in model.graph.initializer}
    return {n.name: next((i for i in n.input if i and i not in inits), "") for n in model.graph.node
            if n.op_type in QUANT_OPS}


def outlier_ratios(fp32_path: Path, samples) -> dict[str, float]:
    import onnxruntime as ort

    from .fp16 import name_nodes

    model = onnx.load(str(fp32_path))
    name_nodes(model)
    acts = _activation_inputs(model)
    names = sorted({a for a in acts.values() if a})
    outs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None)
                              for a in names if a not in outs)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    amax: dict[str, float] = {}
    sq: dict[str, list[float]] = {}
    for feeds in samples:
        for a, x in zip(names, sess.run(names, feeds), strict=True):
            x = np.asarray(x, np.float64)
            amax[a] = max(amax.get(a, 0.0), float(np.abs(x).max()))
            sq.setdefault(a, []).append(float(np.mean(x * x)))
    return {n: amax[a] / max(np.sqrt(np.mean(sq[a])), 1e-12) for n, a in acts.items() if a in amax}


def sensitivity(fp32_path: Path, spec, calib, precision: str = "int8", method: str = "minmax",
                samples: int = 4) -> list[dict[str, Any]]:
    """-> rows sorted most sensitive first: node, op, worst output cosine with only it quantized, outlier ratio."""
    import onnxruntime as ort

    from .fp16 import name_nodes
    from .quality_metrics import cosine

    model = onnx.load(str(fp32_path))
    name_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node if n.op_type in QUANT_OPS}
    del model
    feeds = [f for _, f in zip(range(samples), calib.samples(spec.name), strict=False)]
    s32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    ref = [s32.run(spec.output_names, f) for f in feeds]
    ratios = outlier_ratios(fp32_path, feeds)
    rows = []
    with tempfile.TemporaryDirectory(prefix="janusflow-sens-") as tmp:
        out = Path(tmp) / "one.onnx"
        for node, op in ops.items():
            others = {n: "sensitivity probe" for n in ops if n != node}
            derive_int8(fp32_path, spec, calib, out, precision, method, exclude=others)
            s8 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            worst = min(cosine(b, a) for f, r in zip(feeds, ref, strict=True)
                        for a, b in zip(r, s8.run(spec.output_names, f), strict=True))
            rows.append({"node": node, "op": op, "cosine_alone": worst, "outlier_ratio": ratios.get(node)})
    return sorted(rows, key=lambda r: r["cosine_alone"])
