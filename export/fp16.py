"""FP16 variant of an exported FP32 graph, with FP32 islands chosen by measurement.

Tool: onnxruntime.transformers' float16 converter (ships with onnxruntime, shares this venv). NVIDIA
ModelOpt's AutoCast does the same job but pins its own onnx / onnxruntime-gpu, so it cannot live in
the base environment. The converter takes node_block_list (nodes kept FP32) and keep_io_types.

Islands (node -> reason, all written to the manifest's recipe):
- measured on the calibration samples through the FP32 graph (calibration/ranges.py): a tensor whose
  |x| exceeds OVERFLOW_FRACTION of FP16's max (65504), or any non-finite value, or more than
  FLUSH_LIMIT of whose nonzero values flush to zero in FP16: its producer and all its consumers stay
  FP32 (a consumer in FP16 would receive the tensor cast to FP16, i.e. inf or 0);
- by op, known risky: mean-square / mean / sum reductions (RMSNorm, LayerNorm, GroupNorm, GRN's L2
  norm), powers and roots, softmax, exp, the timestep sin/cos, normalisation ops;
- the argument of every Sin/Cos (its ancestors back to the graph inputs): gen_enc's timestep t runs up to
  ~967, where FP16's spacing is 0.5, and t * frequency in FP16 shifts the phase (measured on tiny,
  held-out t: t_emb cosine 0.996 with the argument in FP16, 1.0000 with it FP32; keeping the timestep
  MLP after the sin/cos FP32 as well changed nothing measurable, so it stays FP16); the LLM's RoPE
  angles (position * inverse frequency) are the same case;
- the producer of the final logits (FP32 for sampling).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, version_converter
from onnx.external_data_helper import load_external_data_for_model
from onnxruntime.transformers import float16 as ort_float16
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from janusflow_trt.calibration.ranges import FP16_MAX, Ranges, measure

from .onnx_graph import graph_opset, name_nodes, tensor_readers
from .onnx_io import external_files, ort_session, save_graph, save_model
from .specs import GraphSpec, compare, fp16_boundary, precision_variant

OVERFLOW_FRACTION = 0.5  # headroom: held-out inputs may reach 2x what calibration saw
FLUSH_LIMIT = 0.01
RISKY_OPS = {
    "ReduceMean": "mean / mean-square reduction (RMSNorm, LayerNorm, GroupNorm)",
    "ReduceSum": "sum reduction (GRN L2 norm, softmax denominators)",
    "ReduceL2": "L2 norm (GRN)",
    "Pow": "square feeding a norm's reduction",
    "Sqrt": "root of a norm's reduction",
    "Reciprocal": "1/x of a norm",
    "Softmax": "softmax (exp and sum)",
    "Exp": "exp overflows FP16 above 11",
    "Sin": "timestep embedding sin",
    "Cos": "timestep embedding cos",
    "LayerNormalization": "LayerNorm",
    "SimplifiedLayerNormalization": "RMSNorm",
    "GroupNormalization": "GroupNorm",
    "InstanceNormalization": "InstanceNorm (GroupNorm)",
}
FP32_OUTPUTS = ("logits",)


@dataclass
class Islands:
    reasons: dict[str, str]  # node name -> why it stays FP32
    measured: dict[str, dict[str, float]]  # flagged tensor -> its measured stats

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.reasons.values():
            k = r.split(":")[0]
            out[k] = out.get(k, 0) + 1
        return out


def choose_islands(model: onnx.ModelProto, ranges: Ranges) -> Islands:
    reasons: dict[str, str] = {}
    measured: dict[str, dict[str, float]] = {}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = tensor_readers(model.graph)
    limit = OVERFLOW_FRACTION * FP16_MAX
    for name, r in ranges.tensors.items():
        why = None
        if r.nonfinite:
            why = f"measured: {name} has non-finite values in FP32"
        elif r.absmax > limit:
            why = f"measured: |{name}| reaches {r.absmax:.4g} > {limit:.0f}"
        elif r.flush_fraction > FLUSH_LIMIT:
            why = f"measured: {100 * r.flush_fraction:.2g}% of nonzero {name} flush to 0 in FP16"
        if why is None:
            continue
        measured[name] = {"absmax": r.absmax, "flush_fraction": r.flush_fraction, "nonfinite": r.nonfinite}
        for n in [producer[name], *consumers.get(name, [])] if name in producer else consumers.get(name, []):
            reasons.setdefault(n.name, why)
    for n in model.graph.node:
        if n.op_type in RISKY_OPS and n.domain in ("", "ai.onnx", "com.microsoft"):
            reasons.setdefault(n.name, f"op: {RISKY_OPS[n.op_type]}")
    for n in sincos_arguments(model):
        reasons.setdefault(n.name, "rule: computes a sin/cos argument (timestep / RoPE angle; FP16 spacing "
                                   "is 0.5 at 512-1024, 2 at 2048-4096)")
        if any(o in FP32_OUTPUTS for o in n.output):
            reasons.setdefault(n.name, "output: final logits stay FP32 for sampling")
    return Islands(reasons, measured)


def sincos_arguments(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node upstream of a Sin or Cos, back to the graph inputs and initializers."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen: dict[str, onnx.NodeProto] = {}
    todo = [x for n in model.graph.node if n.op_type in ("Sin", "Cos") for x in n.input]
    while todo:
        p = producer.get(todo.pop())
        if p is not None and p.name not in seen:
            seen[p.name] = p
            todo.extend(p.input)
    return list(seen.values())


def load_typed(path: Path, opset: int | None = None, weights: bool = True) -> onnx.ModelProto:
    """The graph file at `path` with every tensor's type inferred (value_info), raised to `opset` first if
    given, then its weights loaded. Inference and the version converter run on the weightless proto
    (external initializers keep their type and dims): both pass the model through protobuf
    serialisation, which fails above 2 GB, so given the loaded full-size LLM they would fail (the
    float16 converter's own inference did: "Failed to serialize proto"). Small graphs with inline
    weights take the same path."""
    model = onnx.load(str(path), load_external_data=False)
    if opset is not None and graph_opset(model) < opset:
        model = version_converter.convert_version(model, opset)
    model = onnx.shape_inference.infer_shapes(model)
    if weights:
        load_external_data_for_model(model, str(Path(path).parent))
    return model


@contextlib.contextmanager
def _weightless_converter():
    """The float16 converter reads one thing of a weight that it does not convert itself: its shape, through
    numpy_helper.to_array (make_value_info_from_tensor), which needs the data. On a weightless proto the
    dims say the same. Restored on exit."""
    saved = ort_float16.make_value_info_from_tensor
    ort_float16.make_value_info_from_tensor = lambda t: onnx.helper.make_tensor_value_info(t.name, t.data_type,
                                                                                          list(t.dims))
    try:
        yield
    finally:
        ort_float16.make_value_info_from_tensor = saved


def _external(t: onnx.TensorProto) -> dict[str, str]:
    return {kv.key: kv.value for kv in t.external_data}


def read_initializer(t: onnx.TensorProto, src_dir: Path, dtype: int | None = None) -> np.ndarray:
    """One initializer's array: an external one read alone from its data file in src_dir (as `dtype`, the
    type it was stored with; default its own), an inline one from the proto."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    ref = _external(t)
    a = np.fromfile(src_dir / ref["location"], dtype=onnx.helper.tensor_dtype_to_np_dtype(dtype or t.data_type),
                    count=int(np.prod(t.dims, dtype=np.int64)), offset=int(ref.get("offset", 0)))
    return a.reshape(tuple(t.dims))


_LOW, _HIGH = np.float32(5.96e-08), np.float32(65504.0)  # convert_np_to_float16's defaults, as float32


def to_float16(a: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """The float16 converter's convert_np_to_float16, bytes for bytes (tests/test_streamed_export.py), in one
    pass: nonzero |x| below 5.96e-08 raised to it, finite |x| above 65504 lowered to it, sign kept; 0, NaN
    and inf unchanged. The converter's own version makes ~10 full passes with index arrays (~4 s per 100 M
    weights: most of the full-size LLM's FP16 derivation); here a cast, then only the few values it would
    move fixed, chunk by chunk (bounded temporaries)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    with np.errstate(over="ignore"):  # the values above 65504 that overflow to inf are fixed below
        out = a.astype(np.float16)
    flat, flat16 = a.reshape(-1), out.reshape(-1)
    for s in range(0, flat.size, chunk):
        x = flat[s:s + chunk]
        m = np.abs(x)
        small = (m < _LOW) & (m > 0)
        big = (m > _HIGH) & (m < np.inf)
        fix = np.flatnonzero(small | big)
        if fix.size:
            flat16[s + fix] = np.copysign(np.where(small[fix], _LOW, _HIGH), x[fix]).astype(np.float16)
    return out


def stream_weights(model: onnx.ModelProto, src_dir: Path, types: dict[str, int], out_path: Path,
                   align: int = 4096, transform: Callable[[str, np.ndarray], np.ndarray] | None = None) -> str:
    """`model`'s external initializers (still pointing at the FP32 data file in src_dir) written into
    out_path.name + '.data' one at a time: as stored where their type is unchanged, converted as the
    float16 converter's convert_np_to_float16 does (to_float16: the same bytes) where it turned FLOAT into
    FLOAT16 (types: each initializer's type before conversion), or through transform(name, array) (same
    dtype and shape) when given (INT8's SmoothQuant migration, export/int8.py); -> the data file's name."""
    data = out_path.name + ".data"
    with open(out_path.parent / data, "wb") as f:
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            was = types[t.name]
            a = read_initializer(t, src_dir, was)
            if t.data_type != was:
                assert (was, t.data_type) == (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16), t.name
                a = to_float16(a)
            if transform is not None:
                a = transform(t.name, a)
            f.seek(-f.tell() % align, 1)  # page-aligned: ONNX Runtime maps such tensors instead of copying them
            offset = f.tell()
            f.write(a.tobytes())
            del t.external_data[:]
            for k, v in (("location", data), ("offset", str(offset)), ("length", str(a.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            del a
    return data


def convert(model: onnx.ModelProto, spec: GraphSpec, block: list[str]) -> onnx.ModelProto:
    """`model` from load_typed (its value_info stands in for the converter's own shape inference)."""
    fp16_io = set(fp16_boundary(spec))
    keep = [t.name for t in spec.inputs + spec.outputs if t.dtype == "float32" and t.name not in fp16_io]
    model = convert_float_to_float16(model, keep_io_types=keep, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                     node_block_list=block, disable_shape_infer=True)
    drop_fp16_round_trips(model)
    return model


def _converter_fp16_cast(n: onnx.NodeProto) -> bool:
    return n.name.endswith("_cast_to_fp16_node") or n.name.startswith("graph_input_cast")


def drop_fp16_round_trips(model: onnx.ModelProto) -> int:
    """kept -> Cast(fp16) -> Cast(fp32) -> kept: the converter casts every kept-FP32 node's output to FP16,
    even when the consumer is kept FP32 too, which brings back the overflow the island exists to avoid
    (measured: the overflow test's VAE gives NaN without this). Consumers of such a pair read the FP32
    tensor directly. Only the converter's own casts (by their names) are touched: OnnxModel's
    remove_cascaded_cast_nodes would also fold casts the graph had before (float->int->float), which
    changes values. -> the number of round trips removed."""
    g = model.graph
    by_out = {o: n for n in g.node for o in n.output}
    rewire: dict[str, str] = {}
    for n in g.node:
        if n.op_type == "Cast" and n.name.endswith("_cast_to_fp32_node"):
            p = by_out.get(n.input[0])
            if p is not None and p.op_type == "Cast" and _converter_fp16_cast(p):
                rewire[n.output[0]] = p.input[0]
    if not rewire:
        return 0
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in rewire:
                n.input[i] = rewire[x]
    outputs = {o.name for o in g.output}
    dead = [n for n in g.node if n.op_type == "Cast" and n.output[0] in rewire and n.output[0] not in outputs]
    for n in dead:
        g.node.remove(n)
    used = {x for n in g.node for x in n.input} | outputs
    for n in [n for n in g.node if n.op_type == "Cast" and _converter_fp16_cast(n) and n.output[0] not in used]:
        g.node.remove(n)
    return len(rewire)


def derive_fp16(fp32_path: Path, spec: GraphSpec, calib, out_path: Path, big: bool,
                all_fp32: str | None = None, limit: int | None = None, check: int = 4,
                channels: list[str] | None = None) -> dict[str, Any]:
    """FP32 graph file -> FP16 graph file next to it; -> the recipe. calib: CalibrationData.
    all_fp32: a reason to keep every node FP32 (then only the boundary changes). limit: at most this many
    samples (CalibrationData.select, spread) are measured; check: samples of the FP16-vs-FP32 check.
    channels: activations whose max |x| per channel the range walk also measures (SmoothQuant's, for an
    INT8 variant derived next): returned as 'channel_absmax' (absent with all_fp32: no walk).
    Memory, in order: the range measurement (one ORT session of the FP32 graph), then the FP32 model
    converted in place and saved (big: converted weightless, the weights then streamed one at a time,
    stream_weights), then the two sessions of the check: never all at once."""
    samples = lambda: calib.samples(spec.name, limit)  # noqa: E731
    if calib.count(spec.name) == 0:
        raise ValueError(f"no calibration samples recorded for graph {spec.name}")
    if all_fp32:
        ranges = Ranges(samples=len(calib.select(spec.name, limit)))
    else:
        ranges = measure(fp32_path, samples, channels=channels or ())
    # big: converted on the weightless proto, then the weights streamed into the FP16 data file one at a time
    model = load_typed(fp32_path, weights=not big)
    types = {t.name: t.data_type for t in model.graph.initializer}
    name_nodes(model)
    if all_fp32:
        islands = Islands({n.name: f"request: {all_fp32}" for n in model.graph.node}, {})
    else:
        islands = choose_islands(model, ranges)
    with _weightless_converter() if big else contextlib.nullcontext():
        fp16 = convert(model, spec, sorted(islands.reasons))
    del model
    if big and external_files(fp16):
        stream_weights(fp16, Path(fp32_path).parent, types, out_path)
        data = save_graph(fp16, out_path)
    else:
        data = save_model(fp16, out_path, big)
    del fp16
    checked = calibration_check(fp32_path, out_path, spec, lambda: calib.samples(spec.name, check), check)
    recipe = {
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
        "kept_fp32": islands.reasons, "kept_fp32_counts": islands.counts(), "flagged_tensors": islands.measured,
        "thresholds": {"overflow_abs": OVERFLOW_FRACTION * FP16_MAX, "flush_fraction": FLUSH_LIMIT},
        "fp16_io": fp16_boundary(spec), "tensors_measured": len(ranges.tensors),
        "tensors_unmeasured": len(ranges.unmeasured), "calibration_samples": ranges.samples,
        "calibration_samples_recorded": calib.count(spec.name),
        "calibration_samples_by_kind": calib.kinds(spec.name, limit), "measure_runs_per_sample": ranges.chunks,
        "calibration_check": checked,
    }
    out = {"data": data, "recipe": recipe}
    if channels and not all_fp32:
        out["channel_absmax"] = ranges.channels
    return out


def fp16_feeds(spec16: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in spec16.inputs}


def calibration_check(fp32_path: Path, fp16_path: Path, spec: GraphSpec, samples, limit: int = 4) -> dict:
    """FP16 vs FP32 on the first `limit` of `samples()`: worst cosine per output; all finite. One session
    at a time (a full-size graph's FP32 and FP16 weights never together): the FP32 outputs are kept, the
    FP32 session released, then the FP16 one runs the same feeds."""
    feeds: list[dict[str, np.ndarray]] = []
    for f in samples():
        if len(feeds) >= limit:
            break
        feeds.append(f)
    s32 = ort_session(fp32_path, lean=True)
    ref = [s32.run(spec.output_names, f) for f in feeds]
    del s32
    s16 = ort_session(fp16_path, lean=True)
    spec16 = precision_variant(spec, "fp16")
    worst: dict[str, float] = {}
    finite = True
    for f, a in zip(feeds, ref, strict=True):
        b = s16.run(spec.output_names, fp16_feeds(spec16, f))
        for t, x, y in zip(spec.outputs, a, b, strict=True):
            finite &= bool(np.isfinite(y).all())
            c = compare(y.astype(np.float32), x, t.tol)["cosine"]
            worst[t.name] = min(worst.get(t.name, 1.0), c)
    return {"min_cosine": worst, "finite": finite, "samples": len(feeds)}
