"""INT8 variants of an exported FP32 graph: calibrated Q/DQ (QuantizeLinear/DequantizeLinear) graphs.

Tools, fed the FP32 runtime's recorded inputs (calibration/record.py):
- int8 with $JANUSFLOW_MODELOPT_PYTHON set: NVIDIA ModelOpt's ONNX PTQ (the field's tool for TensorRT's
  Q/DQ placement; it pins its own onnx / onnxruntime-gpu / torch, so it runs in its own environment
  through export/modelopt_worker.py); its float parts are FP16.
- otherwise (and always for int8-cpu): onnxruntime.quantization.quantize_static (QuantFormat.QDQ)
  configured to the same rules, through calibration/int8_calib.py. For int8 its float parts are then
  made FP16 with the FP16 variant's measured FP32 islands (fp16_float_parts: ModelOpt's own recipe,
  quantize in FP32 then convert); int8-cpu keeps them FP32 (ORT's CPU kernels).

Two flavours from the same calibration (the same activation ranges):
- int8 (TensorRT): symmetric INT8, zero points 0 (TensorRT's parser rejects others); weights per output
  channel, activations per tensor; Q/DQ only on the inputs of MatMul / Gemm / Conv (TensorRT fuses
  DQ -> MatMul/Conv into INT8 kernels); norms, softmax, residual adds and graph outputs stay float;
  biases stay float (TensorRT has no INT32 DequantizeLinear).
- int8-cpu (ONNX Runtime CPU): uint8 activations (asymmetric), int8 symmetric weights, per channel:
  the u8s8 layout of ORT's fast QLinearMatMul / MatMulIntegerToFloat / QLinearConv kernels;
  reduce_range (7-bit weights) only on CPUs without VNNI, where u8s8 products can saturate.

Graphs without MatMul/Gemm/Conv work to quantize (embed: a Gather) or known unsafe in INT8 (the
SDXL VAE decoder, which NVIDIA's SDXL INT8 recipe also leaves in FP16/FP32) get an int8 entry that
points at their FP32 file, with the reason in the recipe.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

import janusflow_trt
from janusflow_trt.calibration.int8_calib import (
    METHODS,
    QUANT_OPS,
    RecordedReader,
    calibrated_tensors,
    check_sample,
    cpu_has_vnni,
    tensor_ranges,
)
from janusflow_trt.calibration.ranges import measure
from janusflow_trt.errors import CheckpointError, JanusFlowError

from .fp16 import choose_islands, drop_fp16_round_trips, load_typed, read_initializer, stream_weights
from .onnx_graph import graph_opset, name_nodes, tensor_readers
from .onnx_io import external_files, save_graph
from .smoothquant import ALPHA as SMOOTH_ALPHA
from .smoothquant import GRAPHS as SMOOTH_GRAPHS
from .smoothquant import channel_absmax, load_smoothed, migrations, scaled, smoothing_groups

INT8_PRECISIONS = ("int8", "int8-cpu")
NOT_QUANTIZED = {
    "embed": "a Gather of the token table: no MatMul/Gemm/Conv to quantize",
    "vae_dec": "SDXL VAE decoder: activations exceed FP16 and lose detail in INT8 (NVIDIA's SDXL INT8 "
               "recipe keeps the VAE out of INT8); runs its FP32 graph",
}
MODELOPT_ENV = "JANUSFLOW_MODELOPT_PYTHON"
MODELOPT_METHODS = {"minmax": "max", "entropy": "entropy"}  # ours -> ModelOpt's names (no percentile for int8)
PACKAGE = Path(janusflow_trt.__file__).parent  # site-packages/janusflow_trt, or the source tree's one
DEFAULT_METHOD = "percentile"  # best measured end to end of the three (README: INT8)
MODELOPT_DEFAULT = "minmax"  # ModelOpt's int8 has no percentile; minmax beat entropy end to end with ORT
PERCENTILE = 99.999


# Q/DQ on the inputs of MatMul / Gemm / Conv only: quantize_static would also put a pair on each one's output,
# which nothing reads quantized (float_consumers_read_float gives its float readers the float tensor back and
# drops the pair; an output read by another MatMul is that one's input, quantized there with the same range).
# Not asking for them leaves the same graph and spares the calibration their ranges: at full size the LLM's
# MatMul outputs were 2.4 of the 3.7 GB a sample's walk exposed (calibration/int8_calib.py: calibrated_tensors).
OUTPUT_NOT_QUANTIZED = dict(OpTypesToExcludeOutputQuantization=list(QUANT_OPS))


def flavour_options(precision: str) -> dict[str, Any]:
    """quantize_static keyword arguments of one flavour (the recipe records them). Activation ranges come
    from the calibration cache (calibration/int8_calib.py: tensor_ranges), so no calibrator option."""
    if precision == "int8":
        return dict(activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    reduce_range=False, extra_options=dict(ActivationSymmetric=True, WeightSymmetric=True,
                                                           QuantizeBias=False, **OUTPUT_NOT_QUANTIZED))
    if precision == "int8-cpu":
        return dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    reduce_range=not cpu_has_vnni(),
                    extra_options=dict(ActivationSymmetric=False, WeightSymmetric=True, **OUTPUT_NOT_QUANTIZED))
    raise ValueError(f"not an int8 precision: {precision!r}")


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in QUANT_OPS]


# int8-cpu: what ORT's CPU kernels make faster, by measurement (small preset, Euler-step shapes, 2 threads,
# ORT 1.32, AVX512-VNNI; README: INT8, CPU speed).
CPU_FLOAT_CONV = ("ORT fuses Q/DQ around a Conv only into QLinearConv, which needs a quantized output; ours "
                  "feed float norms and adds, so it ran as DequantizeLinear -> float Conv outside the NCHWc "
                  "kernels: 7x slower than the FP32 Conv (gen_enc's 3 Convs 3.2 -> 23 ms, gen_dec's 5.1 -> "
                  "22.5 ms); stays FP32")
CPU_FLOAT_BMM = ("activation x activation MatMul (attention Q@K^T, P@V): stays FP32. Quantized (uint8 A, int8 "
                 "symmetric B for the u8s8 kernel) it re-quantizes the K/V cache at every decode step and the "
                 "score block at every Euler step, and was slower everywhere: LLM graph, 2 threads, no spinning, "
                 "min over rounds, BMMs int8 -> float: small decode @64 1.19 -> 1.12 ms, @1024 1.93 -> 1.49 ms, "
                 "Euler step 57.7 -> 54.7 ms (FP32 2.17 / 2.54 / 93.3); golden widths decode @64 2.65 -> 2.15 "
                 "ms, @1024 6.62 -> 3.58 ms (FP32 6.08 / 7.42) (README: INT8, CPU speed)")


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose two inputs are both activations (attention's score and value products)."""
    g = model.graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in g.node if n.op_type == "MatMul" and not consts & set(n.input)]


def cpu_plan(model: onnx.ModelProto) -> dict[str, str]:
    """int8-cpu's measured choices for one graph -> excluded node -> reason: every Conv and every
    activation x activation MatMul stays FP32; what is quantized is a weight product (u8s8 kernels)."""
    exclude = {n.name: CPU_FLOAT_CONV for n in model.graph.node if n.op_type == "Conv"}
    return {**exclude, **{name: CPU_FLOAT_BMM for name in activation_matmuls(model)}}


def derive_int8(fp32_path: Path, spec, calib, out_path: Path, precision: str, method: str | None = None,
                exclude: dict[str, str] | None = None, big: bool = False,
                islands: dict[str, str] | None = None, limit: int | None = None,
                smooth_alpha: float | None = SMOOTH_ALPHA, streamed: bool = True) -> dict[str, Any]:
    """FP32 graph file -> Q/DQ graph file; -> {'data': external data file or None, 'recipe': ...}.
    limit: calibrate on at most this many of the graph's recorded samples (the plan's measure_samples;
    CalibrationData.select spreads them over the kinds of call); None: all.
    exclude: node name -> why it stays float (measured sensitivity). islands (int8 with ORT's quantizer):
    the FP16 variant's node -> why it stays FP32; given, every other float part becomes FP16; None keeps
    the float parts FP32 (the sensitivity probes, which measure INT8 error alone). smooth_alpha: the
    SmoothQuant migration strength for the graphs it applies to (export/smoothquant.py); None: off."""
    mo = modelopt_python() if precision == "int8" else None
    method = method or (MODELOPT_DEFAULT if mo else DEFAULT_METHOD)
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}")
    n = len(calib.select(spec.name, limit))
    if n == 0:
        raise CheckpointError(f"calibration data {calib.path}: no samples recorded for graph {spec.name}")
    smoothing: Any = "off"
    alpha = smooth_alpha if spec.name in SMOOTH_GRAPHS else None
    named = out_path.with_name(f".named-{out_path.name}")
    skeleton = onnx.load(str(fp32_path), load_external_data=False)
    skeleton_files = external_files(skeleton)
    weightless = streamed and bool(skeleton_files)
    if weightless:
        amax = smoothing_maxima(fp32_path, spec, calib, limit) if alpha is not None else None
        smoothing = named_streamed(fp32_path, skeleton, named, amax, alpha)
        nodes = quantizable_nodes(skeleton)
    else:
        if alpha is not None:
            model, smoothing = load_smoothed(fp32_path, smoothing_maxima(fp32_path, spec, calib, limit), alpha)
        else:
            model = onnx.load(str(fp32_path))
        name_nodes(model)  # stable names: the recipe's exclusions and the sensitivity table refer to them
        nodes = quantizable_nodes(model)
        onnx.save_model(model, str(named), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=f"{named.name}.data")
        del model
    del skeleton
    if isinstance(smoothing, dict):
        smoothing.update(samples=n, limit=limit)
    exclude = dict(exclude or {})
    if mo is not None:
        try:
            r = _modelopt(mo, named, spec, calib, out_path, method, exclude, len(nodes), limit)
            r["recipe"]["smoothquant"] = smoothing
            return r
        finally:
            named.unlink(missing_ok=True)
            Path(f"{named}.data").unlink(missing_ok=True)
    opts = flavour_options(precision)
    plan = cpu_plan(onnx.load(str(named), load_external_data=False)) if precision == "int8-cpu" else {}
    exclude = {**plan, **exclude}
    cal = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy}[method]
    cache = out_path.with_name(f".ranges-{out_path.name}.json")
    try:
        reader = RecordedReader(calib, spec, limit)
        key = (_graph_file(fp32_path, skeleton_files), method, PERCENTILE, limit, alpha)
        save_tensors_data(_activation_ranges(calib, key, named, reader.feeds, method, frozenset(plan)), cache)
        quantize_static(str(named), str(out_path), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANT_OPS), nodes_to_exclude=sorted(exclude),
                        calibrate_method=cal, use_external_data_format=big, calibration_cache_path=str(cache),
                        **opts)
    finally:
        cache.unlink(missing_ok=True)
        named.unlink(missing_ok=True)
        Path(f"{named}.data").unlink(missing_ok=True)
    float_parts: Any = "FP32 (norms, softmax, residual adds, outputs)"
    save = lambda m: onnx.save_model(m, str(out_path), save_as_external_data=big,  # noqa: E731
                                     all_tensors_to_one_file=True, location=f"{out_path.name}.data")
    q = onnx.load(str(out_path), load_external_data=not weightless)
    rewired = float_consumers_read_float(q)  # weightless: removes only unread scales / zero points' references
    if weightless and external_files(q):
        save_graph(q, out_path)
    else:
        save(q)
    del q
    if precision == "int8" and islands is not None:  # re-read typed (fp16.load_typed: no >2 GB serialisation)
        q, float_parts = fp16_float_parts(load_typed(out_path, FP16_QDQ_OPSET), islands)
        save(q)
        del q
    data = f"{out_path.name}.data" if big and Path(f"{out_path}.data").is_file() else None
    recipe = {
        "tool": "onnxruntime.quantization.quantize_static (QuantFormat.QDQ)",
        "flavour": "TensorRT: symmetric int8, zero points 0" if precision == "int8"
                   else "ONNX Runtime CPU: uint8 activations, int8 weights",
        "calibration_method": method, **({"percentile": PERCENTILE} if method == "percentile" else {}),
        "calibration_tool": "ORT's collectors (MinMax / HistogramCollector) over chunked, arena-free sessions "
                            "(calibration/int8_calib.py: tensor_ranges), fed to quantize_static as its "
                            "calibration cache",
        "activations": "per tensor, " + ("symmetric int8" if precision == "int8" else "asymmetric uint8"),
        "weights": "per output channel, symmetric int8" + (", reduce_range (7-bit)" if opts["reduce_range"] else ""),
        "reduce_range": opts["reduce_range"], "cpu_vnni": cpu_has_vnni(),
        "quantized_op_types": list(QUANT_OPS), "quantized_nodes": len(nodes) - len(exclude),
        "excluded": exclude, "float_consumers_rewired": rewired,
        "bias": "float" if precision == "int8" else "int32 (ORT default)",
        "float_parts": float_parts, "smoothquant": smoothing, "calibration_samples": n,
        "calibration_samples_recorded": calib.count(spec.name),
        "calibration_samples_by_kind": calib.kinds(spec.name, limit),
    }
    return {"data": data, "recipe": recipe}


def _activation_ranges(calib, key: tuple, named: Path, feeds, method: str, skip: frozenset[str]) -> TensorsData:
    """The FP32 graph's activation ranges (smoothed as derive_int8 does) for a derivation whose fixed plan
    keeps the nodes in `skip` float: they depend on neither the flavour nor the quality gate's exclusions,
    so they are measured once per graph file and recipe (`key`) from this calibration set and reused by
    the other flavour and by every re-derivation of the gate's search (at full size the LLM's walk is
    minutes and the export's peak). A set measured for fewer skipped nodes covers more tensors: reused,
    cut to the tensors this derivation calibrates (calibrated_tensors), so the quantizer reads the same."""
    for (kind, k, measured_skip), ranges in calib.ranges.items():
        if kind == "ranges" and k == key and measured_skip <= skip:
            if measured_skip == skip:
                return ranges
            needed = calibrated_tensors(onnx.load(str(named), load_external_data=False), skip)
            return TensorsData(ranges.calibration_method, {n: ranges.data[n] for n in needed})
    calib.ranges[("ranges", key, skip)] = ranges = tensor_ranges(named, feeds, method, PERCENTILE, skip=skip)
    return ranges


def smoothing_maxima(fp32_path: Path, spec, calib, limit: int | None) -> dict[str, Any]:
    """SmoothQuant's input: max |x| per channel of every activation smoothing_groups finds in the FP32 graph,
    over the graph's calibration samples (limit: at most that many, CalibrationData.select), measured once
    per graph file and calibration set (calib.ranges) and reused by every derivation and by the gate's
    probes and float weights (at full size each walk is 8 LLM runs, ~1 min). The FP16 variant's range walk
    over the same samples measures them alongside when it runs first (keep_smoothing_maxima)."""
    key = _smoothing_key(fp32_path, limit)
    if key not in calib.ranges:
        calib.ranges[key] = channel_absmax(fp32_path, RecordedReader(calib, spec, limit).feeds,
                                           smoothed_activations(fp32_path, spec))
    return calib.ranges[key]


def smoothed_activations(fp32_path: Path, spec) -> list[str]:
    """The activations SmoothQuant migrates in this graph (none outside SMOOTH_GRAPHS)."""
    if spec.name not in SMOOTH_GRAPHS:
        return []
    return list(smoothing_groups(onnx.load(str(fp32_path), load_external_data=False)))


def keep_smoothing_maxima(fp32_path: Path, calib, limit: int | None, amax: dict[str, Any]) -> None:
    """Channel maxima of smoothed_activations measured elsewhere on calib.samples(graph, limit) (the FP16
    range walk) kept for smoothing_maxima: its walk is then not run again."""
    calib.ranges.setdefault(_smoothing_key(fp32_path, limit), amax)


def _smoothing_key(fp32_path: Path, limit: int | None) -> tuple:
    skeleton = onnx.load(str(fp32_path), load_external_data=False)
    return ("smoothing", (_graph_file(fp32_path, external_files(skeleton)), limit), None)


def _graph_file(fp32_path: Path, data_files) -> tuple:
    """A graph file's identity in the statistics cache keys: its resolved path, and it and its data files as
    (name, size, mtime_ns) (a rewritten graph is another key)."""
    paths = [Path(fp32_path)] + [Path(fp32_path).parent / f for f in data_files]
    return str(Path(fp32_path).resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


def named_streamed(fp32_path: Path, model: onnx.ModelProto, named: Path, amax: dict[str, Any] | None,
                   alpha: float | None) -> Any:
    """The quantizer's input written without loading the weights: `model` (fp32_path's weightless proto)
    gets stable node names and, with alpha, SmoothQuant's migration (export/smoothquant.py: the scales from
    the channel maxima `amax` (smoothing_maxima) and the products' weights, read one at a time); its weights are then
    streamed from fp32_path's data file into named's, each scaled by its migration steps in order (the
    same float operations as smooth() on the loaded model: equal bytes). -> the recipe's smoothing record."""
    src = Path(fp32_path).parent
    smoothing: Any = "off"
    steps: list[tuple[str, Any]] = []
    if alpha is not None:
        name_nodes(model)  # the record names the products
        inits = {t.name: t for t in model.graph.initializer}
        steps, products = migrations(model, amax, alpha, lambda name: read_initializer(inits[name], src))
        smoothing = {"alpha": alpha, "products": products}
    name_nodes(model)
    factors: dict[str, list[Any]] = {}
    for name, factor in steps:
        factors.setdefault(name, []).append(factor)

    def migrate(name: str, a):
        for factor in factors.get(name, ()):
            a = scaled(a, factor)
        return a

    for t in model.graph.initializer:  # inline (small) ones are migrated in the proto
        if t.data_location != onnx.TensorProto.EXTERNAL and t.name in factors:
            t.CopyFrom(numpy_helper.from_array(migrate(t.name, numpy_helper.to_array(t)), t.name))
    stream_weights(model, src, {t.name: t.data_type for t in model.graph.initializer}, named, transform=migrate)
    save_graph(model, named)
    return smoothing


def float_consumers_read_float(model: onnx.ModelProto) -> int:
    """ORT's quantizer routes every consumer of a quantized activation through its Q/DQ pair, so a
    residual Add or a Shape beside the MatMul would read the 8-bit value. Those consumers read the float
    tensor again: Q/DQ stays on MatMul/Gemm/Conv inputs only (TensorRT's placement). -> consumers rewired."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    n_rewired = 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight: initializer -> DQ
        for n in g.node:
            if n.op_type in QUANT_OPS:
                continue
            for i, x in enumerate(n.input):
                if x == dq.output[0]:
                    n.input[i] = q.input[0]
                    n_rewired += 1
        if dq.output[0] in outputs:  # e.g. present.*.value: the graph output is the float tensor again
            y, x, new = dq.output[0], q.input[0], f"{dq.output[0]}_dequantized"
            for n in g.node:
                if n.op_type in QUANT_OPS:
                    n.input[:] = [new if i == y else i for i in n.input]
            dq.output[0] = new
            for n in g.node:
                n.input[:] = [y if i == x else i for i in n.input]
                n.output[:] = [y if o == x else o for o in n.output]
            n_rewired += 1
    for op in ("DequantizeLinear", "QuantizeLinear"):  # pairs left with no reader (their only readers were float)
        used = {i for n in g.node for i in n.input} | outputs
        for n in [n for n in g.node if n.op_type == op and n.output[0] not in used]:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return n_rewired


FP16_QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear-19: FP16 scales; DQ outputs the scale's type


def fp16_float_parts(model: onnx.ModelProto, islands: dict[str, str]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A Q/DQ graph with FP32 float parts -> the same graph with FP16 float parts, as TensorRT runs it
    (strongly typed: each tensor's type is the graph's). Opset 19 so that Q/DQ take FP16 scales: DQ(int8,
    scale fp16) then outputs FP16 and feeds the FP16 MatMul/Gemm/Conv directly; a Cast between DQ and the
    MatMul would hide the pair from TensorRT's Q/DQ fusion (ModelOpt folds exactly those casts:
    modelopt/onnx/utils.py fold_dq_fp32_to_fp16_casts). Nodes in `islands` (the FP16 variant's measured
    overflow / flush tensors, norms, softmax, the logits) stay FP32, and so does a Q/DQ pair whose
    readers are all islands (DQ(scale fp32) -> FP32 MatMul, again with no Cast between). Graph inputs and
    outputs stay FP32: the int8 variant's boundary (export/specs.py: precision_variant). -> (model, recipe)."""
    if graph_opset(model) < FP16_QDQ_OPSET or not model.graph.value_info:
        raise ValueError(f"fp16_float_parts takes a model from fp16.load_typed(path, {FP16_QDQ_OPSET})")
    g = model.graph
    readers = tensor_readers(g)
    block = set(islands)
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
    for dq in dqs:
        if readers.get(dq.output[0]) and all(r.name in block for r in readers[dq.output[0]]):
            block.add(dq.name)
    for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:  # Q and its DQs share the scale initializer
        if all(r.name in block for r in readers.get(q.output[0], [])):
            block.add(q.name)
    fp32_qdq = len(block) - len(set(islands))
    keep_io = [t.name for t in [*g.input, *g.output] if t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    model = convert_float_to_float16(model, keep_io_types=keep_io, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                     node_block_list=sorted(block), disable_shape_infer=True)
    round_trips = drop_fp16_round_trips(model)
    present = {n.name for n in model.graph.node}
    return model, {"dtype": "FP16", "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
                   "opset": FP16_QDQ_OPSET, "io": "FP32 (the int8 variant's boundary; cast inside the graph)",
                   "kept_fp32": {k: v for k, v in islands.items() if k in present},
                   "fp32_qdq_nodes": fp32_qdq, "fp32_round_trips_removed": round_trips}


def fp16_islands(fp32_path: Path, spec, calib, fp16_entry: dict | None, limit: int | None = None) -> dict[str, str]:
    """The FP16 variant's FP32 islands (node -> reason): its recipe when this export made it, else
    measured the same way (calibration/ranges.py on the same recorded samples)."""
    if fp16_entry and "kept_fp32" in fp16_entry.get("recipe", {}):
        return dict(fp16_entry["recipe"]["kept_fp32"])

    model = onnx.load(str(fp32_path), load_external_data=False)
    name_nodes(model)
    return choose_islands(model, measure(fp32_path, lambda: calib.samples(spec.name, limit))).reasons


def modelopt_python() -> str | None:
    """The interpreter of a separate environment with nvidia-modelopt[onnx] ($JANUSFLOW_MODELOPT_PYTHON)."""
    py = os.environ.get(MODELOPT_ENV)
    if py and not Path(py).is_file():
        raise JanusFlowError(f"${MODELOPT_ENV}={py}: no such interpreter")
    return py or None


def _modelopt(py: str, named: Path, spec, calib, out_path: Path, method: str, exclude: dict[str, str],
              quantizable: int, limit: int | None = None) -> dict[str, Any]:
    if method not in MODELOPT_METHODS:
        raise JanusFlowError(f"--calib-method {method}: ModelOpt's int8 offers {','.join(MODELOPT_METHODS)} "
                             f"(unset ${MODELOPT_ENV} for ONNX Runtime's quantizer)")
    if limit is not None and limit < calib.count(spec.name):
        raise JanusFlowError(f"ModelOpt int8 of {spec.name}: the worker calibrates on every recorded sample; "
                             f"use --calib-plan default, or unset ${MODELOPT_ENV} for ONNX Runtime's quantizer")
    for k, feeds in enumerate(calib.samples(spec.name)):  # the worker feeds these unchecked
        check_sample(spec, feeds, f"{spec.name} sample {k}")
    cmd = [py, "-m", "janusflow_trt.export.modelopt_worker", str(named), str(calib.path), spec.name, str(out_path),
           MODELOPT_METHODS[method], ",".join(sorted(exclude))]
    with tempfile.TemporaryDirectory() as path:
        # janusflow_trt alone on the worker's path: its parent (site-packages in a wheel install) would put
        # this environment's onnx / onnxruntime / numpy ahead of the ones ModelOpt pins
        (Path(path) / "janusflow_trt").symlink_to(PACKAGE, target_is_directory=True)
        r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}, cwd=str(out_path.parent), capture_output=True,
                           text=True)
    if r.returncode != 0 or not out_path.is_file():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise JanusFlowError(f"ModelOpt int8 of {spec.name} failed (exit {r.returncode}): {last}")
    q = onnx.load(str(out_path))
    rewired = float_consumers_read_float(q)  # ModelOpt also quantizes residual Adds / norms' inputs for fusion
    onnx.save_model(q, str(out_path))
    del q
    version = subprocess.run([py, "-c", "import modelopt; print(modelopt.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    recipe = {
        "tool": f"nvidia-modelopt {version} modelopt.onnx.quantization (int8), its own environment",
        "flavour": "TensorRT: symmetric int8, zero points 0", "calibration_method": method,
        "activations": "per tensor, symmetric int8", "weights": "per output channel, symmetric int8",
        "quantized_op_types": list(QUANT_OPS),
        "quantizable_nodes": quantizable, "excluded": exclude, "float_consumers_rewired": rewired,
        "float_parts": "FP16 (ModelOpt AutoCast), FP32 graph inputs/outputs",
        "calibration_samples": calib.count(spec.name),
    }
    return {"data": None, "recipe": recipe}


def passthrough_recipe(name: str) -> dict[str, Any]:
    return {"not_quantized": NOT_QUANTIZED[name], "float_parts": "the whole FP32 graph"}
