"""Per-node INT8 sensitivity of one graph: each MatMul/Gemm/Conv quantized alone (every other node
excluded), run on the first calibration samples, compared with FP32: the worst output cosine. The
nodes whose lone quantization costs the most are the ones to keep float. Also each node's activation
outlier ratio (absmax / rms of its float input over the same samples): per-tensor INT8 spends its 255
levels on the absmax, so a ratio of 100 leaves the bulk of the values a few levels.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from janusflow_trt.calibration.ranges import lean_options, walk_exposed

from .int8 import QUANT_OPS, derive_int8, named_streamed, smoothing_maxima
from .onnx_graph import drop_dead, name_nodes
from .onnx_io import copy_graph, external_files
from .quality_metrics import cosine
from .smoothquant import load_smoothed


def _activation_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """node -> its first non-initializer input (the activation per-tensor INT8 would quantize)."""
    inits = {t.name for t in model.graph.initializer}
    return {n.name: next((i for i in n.input if i and i not in inits), "") for n in model.graph.node
            if n.op_type in QUANT_OPS}


def outlier_ratios(fp32_path: Path, samples) -> dict[str, float]:
    """node -> absmax / rms of its activation input over `samples` (a list of feeds), the activations read
    through calibration/ranges.py: walk_exposed (chunks of exposed tensors, unoptimised, no arena, no
    prepacking: at full size the LLM's weights plus one chunk, not every activation at once)."""
    model = onnx.load(str(fp32_path), load_external_data=False)
    name_nodes(model)
    acts = _activation_inputs(model)
    names = sorted({a for a in acts.values() if a})
    del model
    amax: dict[str, float] = {}
    sq: dict[str, list[float]] = {}
    for _, values in walk_exposed(fp32_path, lambda: samples, names):
        for a, x in values.items():
            x = np.asarray(x, np.float64)
            amax[a] = max(amax.get(a, 0.0), float(np.abs(x).max()))
            sq.setdefault(a, []).append(float(np.mean(x * x)))
    return {n: amax[a] / max(np.sqrt(np.mean(sq[a])), 1e-12) for n, a in acts.items() if a in amax}


def sensitivity(fp32_path: Path, spec, calib, precision: str = "int8", method: str = "minmax",
                samples: int = 4) -> list[dict[str, Any]]:
    """-> rows sorted most sensitive first: node, op, worst output cosine with only it quantized, outlier ratio."""
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


def only_quantized(qdq: onnx.ModelProto, fp32: onnx.ModelProto, keep: set[str]) -> onnx.ModelProto:
    """The calibrated Q/DQ graph (FP32 float parts) with only the nodes in `keep` quantized: every other
    MatMul/Gemm/Conv reads its FP32 inputs again (activations are still in the graph, weights come back
    from the FP32 graph). One calibration for every probe, and the kept nodes keep the product's scales.
    The Q/DQ nodes and INT8 weights left unread are dropped (onnx_graph.drop_dead): an unoptimised probe
    session would load every INT8 weight beside the FP32 ones and dequantize them all on each run (at full
    size the LLM's probe sessions peaked 12-13 GB over the process, its reference session 7)."""
    m = copy.deepcopy(qdq)
    inputs32 = {n.name: list(n.input) for n in fp32.graph.node if n.op_type in QUANT_OPS}
    inits32 = {t.name: t for t in fp32.graph.initializer}
    # a name the Q/DQ graph already defines (an initializer, or a node's output: int8-cpu's dequantized bias
    # keeps the float bias's name) is read from it, never defined twice
    have = {t.name for t in m.graph.initializer} | {o for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.name in inputs32 and n.name not in keep:
            n.input[:] = inputs32[n.name]
            for i in n.input:
                if i in inits32 and i not in have:
                    m.graph.initializer.append(inits32[i])
                    have.add(i)
    drop_dead(m)
    return m


def one_sided(qdq: onnx.ModelProto, weights32: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The calibrated Q/DQ graph with one side of its INT8 taken out. weights32 None: every quantized
    activation is read in float again (weight-only INT8: the products read Q's float input, not DQ(Q(x)));
    given (the FP32 graph, smoothed as the Q/DQ graph is: float_weights): every quantized product reads its
    FP32 weight from it again (activation-only INT8). Which of the two costs the logits more says whether
    calibration (activations) or the INT8 weights themselves cause an error."""
    m = copy.deepcopy(qdq)
    inits = {t.name for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    dq_src = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    if weights32 is None:
        back = {o: prod[src].input[0] for o, src in dq_src.items()
                if src not in inits and src in prod and prod[src].op_type == "QuantizeLinear"}
        # the INT8 weights dequantized here, as FP32 initializers: left as DQ -> MatMul with a float input,
        # ORT's CPU provider rewrites the pair into MatMulNBits (its optimized graph), whose logits are not
        # DQ(W) @ x (up to 0.055 apart on tiny's, measured)
        vals = {t.name: t for t in m.graph.initializer}
        for n in [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]:
            w, sc = (numpy_helper.to_array(vals[i]).astype(np.float64) for i in n.input[:2])
            zp = numpy_helper.to_array(vals[n.input[2]]).astype(np.float64) if len(n.input) > 2 and n.input[2] else 0
            if sc.ndim:  # per channel along `axis`
                shape = [1] * w.ndim
                shape[{a.name: a.i for a in n.attribute}.get("axis", 1)] = -1
                sc, zp = sc.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
            back[n.output[0]] = f"{n.output[0]}_float"
            m.graph.initializer.append(numpy_helper.from_array(((w - zp) * sc).astype(np.float32), back[n.output[0]]))
        for n in m.graph.node:
            if n.op_type in QUANT_OPS:
                n.input[:] = [back.get(i, i) for i in n.input]
        return m
    inputs32 = {n.name: list(n.input) for n in weights32.graph.node if n.op_type in QUANT_OPS}
    inits32 = {t.name: t for t in weights32.graph.initializer}
    for n in m.graph.node:
        if n.op_type in QUANT_OPS and n.name in inputs32:
            for k, i in enumerate(n.input):
                if i in dq_src and dq_src[i] in inits:  # a dequantized weight
                    w = inputs32[n.name][k]
                    n.input[k] = w
                    if w not in inits:
                        m.graph.initializer.append(inits32[w])
                        inits.add(w)
    return m


def float_weights(fp32_path: Path, spec, calib, smoothing: dict) -> onnx.ModelProto:
    """The FP32 graph smoothed as a Q/DQ graph's recipe['smoothquant'] says (the same ranges, from the same
    samples): the FP32 weights that go with that graph's smoothed norms."""
    amax = smoothing_maxima(fp32_path, spec, calib, smoothing["limit"])
    m, again = load_smoothed(fp32_path, amax, smoothing["alpha"])
    if again["products"] != smoothing["products"]:
        raise ValueError(f"{fp32_path}: smoothed, it gives other products than the Q/DQ graph's record")
    return m


def chat_sensitivity(fp32_path: Path, qdq_path: Path, spec, calib, samples: int = 8,
                     smoothing: dict | str | None = None) -> list[dict[str, Any]]:
    """LLM nodes by what their INT8 costs chat: on the recorded chat calls (prefill and decode), each
    quantized node alone ('alone') and every quantized node but it ('without'), vs FP32: worst logits
    cosine and the share of calls whose argmax (the greedy token) differs; each node's activation
    outlier ratio. -> rows: all quantized first, then the most costly alone.
    smoothing: the Q/DQ graph's recipe['smoothquant'] record; a smoothed graph's un-quantized nodes then
    take their FP32 weights from the FP32 graph smoothed the same way (its norms are the smoothed ones)."""

    chat = [f for f in calib.index["files"] if f["graph"] == spec.name and f["source"].startswith("chat:")]
    keep = {f["file"] for f in chat[:samples]}
    feeds = []
    for f, x in zip([f for f in calib.index["files"] if f["graph"] == spec.name], calib.samples(spec.name),
                    strict=True):
        if f["file"] in keep:
            feeds.append(x)
    f32 = onnx.load(str(fp32_path))
    name_nodes(f32)
    weights32 = float_weights(fp32_path, spec, calib, smoothing) if isinstance(smoothing, dict) else f32
    q = onnx.load(str(qdq_path))
    dq_out = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = sorted(n.name for n in q.graph.node if n.op_type in QUANT_OPS and set(n.input) & dq_out)
    ops = {n.name: n.op_type for n in q.graph.node}
    so = ort.SessionOptions()
    so.log_severity_level = 3

    def run(model):
        s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [s.run(["logits"], f)[0] for f in feeds]

    ref = run(f32)

    def score(model) -> dict[str, float]:
        out = run(model)  # logits [1, V]: the position whose token the call picks
        return {"logits_cosine": min(cosine(a, b) for a, b in zip(out, ref, strict=True)),
                "top1_flip": float(np.mean([np.argmax(a) != np.argmax(b) for a, b in zip(out, ref, strict=True)]))}

    ratios = outlier_ratios(fp32_path, feeds)
    rows = [{"node": "(all quantized)", "op": "", **{f"without_{k}": v for k, v in score(q).items()}}]
    for node in quantized:
        alone = score(only_quantized(q, weights32, {node}))
        without = score(only_quantized(q, weights32, set(quantized) - {node}))
        rows.append({"node": node, "op": ops[node], "outlier_ratio": ratios.get(node),
                     **{f"alone_{k}": v for k, v in alone.items()}, **{f"without_{k}": v for k, v in without.items()}})
    return [rows[0], *sorted(rows[1:], key=lambda r: r["alone_top1_flip"], reverse=True)]


def weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """MatMul/Gemm/Conv node -> bytes of its initializer inputs (what keeping it float keeps at FP32)."""
    size = {t.name: int(np.prod(t.dims, dtype=np.int64)) * 4 for t in model.graph.initializer}
    return {n.name: sum(size.get(i, 0) for i in n.input) for n in model.graph.node if n.op_type in QUANT_OPS}


def rank_nodes(fp32_path: Path, spec, calib, precision: str, method: str | None, limit: int | None,
               samples: int = 4, exclude: dict[str, str] | None = None,
               outputs: list[str] | None = None, probes: int | None = None,
               derived: tuple[Path, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The quality gate's ranking: one calibration of the graph (FP32 float parts; the same recipe, SmoothQuant
    included), then each quantized node alone (only_quantized: the others read FP32 again) on `samples`
    spread calibration samples vs FP32: the worst cosine over every output and sample. -> rows, most
    sensitive first: node, op, cosine_alone, weight_bytes, outlier_ratio (when measured), probed_of ([nodes
    probed, nodes quantized]). exclude: nodes already kept float. outputs: the outputs compared (default all; the
    LLM's `logits` alone for a chat miss).
    probes: probe at most this many nodes, those whose activation input has the largest outlier ratio
    (absmax / rms, measured on the same samples in the float graph the probes start from, smoothed as
    they are): per-tensor INT8 spends its levels on the absmax, so these are the likely worst. None: every
    node (a probe of the full-size LLM costs a session over its 5.4 GB of weights: ~170 probes are hours).
    A graph with external weights (the full-size LLM: 5.4 GB, past protobuf's 2 GB) is probed weightless:
    the probe calibration and the FP32 weights (smoothed as the probe: named_streamed) are written as
    graphs with data files into one temporary folder, and each probe is the proto with external
    references saved there (graph only) and opened by path: no weight is serialised or held twice.
    derived: (graph file, its recipe) of this graph already calibrated with the same recipe, `exclude` and
    FP32 float parts (the export's int8-cpu variant before the gate keeps a node float): copied in as the
    probes' calibration instead of deriving it again (at full size the LLM's quantize_static and its
    smoothed copy: ~1 min)."""
    names = outputs or spec.output_names
    feeds = list(calib.samples(spec.name, samples))
    weightless = bool(external_files(onnx.load(str(fp32_path), load_external_data=False)))
    # the reference and every probe unoptimised, without prepacking or an arena (calibration/ranges.py):
    # a default session prepacks a second copy of the weights, and at full size the gate's search peaked
    # at 16.7 GB while the LLM's reference and probe sessions ran; a handful of probes need no fast kernels
    so = lean_options()
    with tempfile.TemporaryDirectory(prefix="janusflow-rank-") as tmp:
        probe, float32 = Path(tmp) / "probe.onnx", Path(tmp) / "float32.onnx"
        if derived is None:
            r = derive_int8(fp32_path, spec, calib, probe, precision, method, exclude=exclude, limit=limit,
                            big=weightless)
            smoothing = r["recipe"].get("smoothquant")
        else:
            probe = copy_graph(derived[0], Path(tmp))
            smoothing = derived[1].get("smoothquant")
        q = onnx.load(str(probe), load_external_data=not weightless)
        if weightless:
            weights32 = _streamed_float_weights(fp32_path, spec, calib, smoothing, float32)
        else:
            f32 = onnx.load(str(fp32_path))
            name_nodes(f32)
            weights32 = float_weights(fp32_path, spec, calib, smoothing) if isinstance(smoothing, dict) else f32
        sizes = weight_bytes(weights32)  # dims only: the same names and shapes as the FP32 graph's
        dq_out = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        quantized = sorted(n.name for n in q.graph.node if n.op_type in QUANT_OPS and set(n.input) & dq_out)
        ops = {n.name: n.op_type for n in q.graph.node}
        ratios: dict[str, float] = {}
        n_quantized = len(quantized)
        if probes is not None and len(quantized) > probes:
            if not weightless:
                onnx.save_model(weights32, str(float32))
            ratios = outlier_ratios(float32, feeds)
            quantized = sorted(quantized, key=lambda n: (-ratios.get(n, 0.0), n))[:probes]
        s32 = ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
        ref = [s32.run(names, f) for f in feeds]  # after the calibration: never held beside its walk
        del s32
        rows = []
        for node in quantized:
            s = _probe_session(only_quantized(q, weights32, {node}), Path(tmp) if weightless else None, so)
            worst = min(cosine(b, a) for f, r32 in zip(feeds, ref, strict=True)
                        for a, b in zip(r32, s.run(names, f), strict=True))
            del s
            rows.append({"graph": spec.name, "node": node, "op": ops[node], "cosine_alone": worst, "outputs": names,
                         "weight_bytes": sizes.get(node, 0), "outlier_ratio": ratios.get(node),
                         "probed_of": [len(quantized), n_quantized]})
    return sorted(rows, key=lambda r: r["cosine_alone"])


def _streamed_float_weights(fp32_path: Path, spec, calib, smoothing: dict | str | None,
                            path: Path) -> onnx.ModelProto:
    """float_weights without loading the weights: the FP32 graph, named and smoothed as the probe's record
    says, written to `path` + its data file (export/int8.py: named_streamed, the quantizer's own input);
    -> its weightless proto (external references to that data file)."""
    skeleton = onnx.load(str(fp32_path), load_external_data=False)
    if isinstance(smoothing, dict):
        again = named_streamed(fp32_path, skeleton, path, smoothing_maxima(fp32_path, spec, calib, smoothing["limit"]),
                               smoothing["alpha"])
        if again["products"] != smoothing["products"]:
            raise ValueError(f"{fp32_path}: smoothed, it gives other products than the probe's record")
    else:
        named_streamed(fp32_path, skeleton, path, None, None)
    return onnx.load(str(path), load_external_data=False)


def _probe_session(model: onnx.ModelProto, folder: Path | None, so: ort.SessionOptions) -> ort.InferenceSession:
    """A probe graph's CPU session: inline (folder None) from its bytes; weightless, saved into `folder`
    (where the data files its external references name lie; onnx writes no tensor that has no raw data)
    and opened by path."""
    if folder is None:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    path = folder / "one.onnx"
    onnx.save_model(model, str(path))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
