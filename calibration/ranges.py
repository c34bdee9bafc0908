"""Range measurement: every float tensor of an FP32 ONNX graph over the calibration samples.

The graph is re-saved next to the original (so external data still resolves, and no weight is
copied) with chosen intermediate tensors added as outputs, in chunks of at most `chunk_bytes` of
exposed activations per run (ONNX Runtime holds every requested output until the run ends; at full
size one Euler-step LLM sample has ~14 GB of them: 2 rows x 577 tokens, attention scores
2x16x577x602 fp32 = 44 MB each), sized by shape inference on the largest sample's input shapes.
Every chunk walks all samples once, so the cost is chunks x samples runs. ONNX Runtime runs it
unoptimised, so every tensor is the value the unfused graph computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest FP16 subnormal: nonzero values below half of it become 0


@dataclass
class Range:
    absmax: float = 0.0
    nonzero: int = 0
    flushed: int = 0  # nonzero in FP32, zero in FP16
    nonfinite: int = 0

    def update(self, x: np.ndarray) -> None:
        a = np.abs(x.astype(np.float32, copy=False))
        fin = np.isfinite(a)
        self.nonfinite += int(a.size - fin.sum())
        if fin.any():
            self.absmax = max(self.absmax, float(a[fin].max()))
        nz = a != 0
        self.nonzero += int(nz.sum())
        self.flushed += int((nz & (a < FP16_TINY / 2)).sum())

    @property
    def flush_fraction(self) -> float:
        return self.flushed / self.nonzero if self.nonzero else 0.0


@dataclass
class Ranges:
    tensors: dict[str, Range] = field(default_factory=dict)
    samples: int = 0
    unmeasured: list[str] = field(default_factory=list)  # outputs of unknown type (shape inference gave none)
    chunks: int = 0  # runs per sample (exposed-tensor chunks)


def float_tensors(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """-> (names of float32 node outputs, names whose type is unknown)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    floats, unknown = [], []
    for node in model.graph.node:
        for o in node.output:
            if not o:
                continue
            t = types.get(o)
            if t == onnx.TensorProto.FLOAT:
                floats.append(o)
            elif t is None or t == onnx.TensorProto.UNDEFINED:
                unknown.append(o)
    return floats, unknown


def tensor_bytes(model: onnx.ModelProto, names: list[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Bytes of each float32 tensor in `names` for these input shapes (shape inference with the graph
    inputs' dims fixed). One dim that inference leaves symbolic is taken as the largest batch (leading)
    dim of the inputs (the dynamo graphs lose the batch through the attention mask's Where/Expand); a
    tensor with more unknown dims, or of unknown rank, counts as the largest known one."""
    m = onnx.ModelProto()
    m.CopyFrom(model)  # the graph proto only (loaded without external data)
    for v in m.graph.input:
        if v.name in shapes:
            shape = v.type.tensor_type.shape
            shape.ClearField("dim")
            for n in shapes[v.name]:
                shape.dim.add().dim_value = n
    batch = max((s[0] for s in shapes.values() if len(s)), default=1)
    g = onnx.shape_inference.infer_shapes(m, data_prop=True).graph
    known = {}
    for v in [*g.value_info, *g.output]:
        t = v.type.tensor_type
        if t.HasField("shape") and sum(not d.HasField("dim_value") for d in t.shape.dim) <= 1:
            dims = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
            known[v.name] = 4 * int(np.prod(dims, dtype=np.int64))
    worst = max(known.values(), default=1)
    return {n: known.get(n, worst) for n in names}


def chunks(names: list[str], size: dict[str, int], budget: int) -> list[list[str]]:
    """Consecutive runs of names of at most `budget` bytes (a tensor larger than it goes alone)."""
    out: list[list[str]] = [[]]
    used = 0
    for n in names:
        if out[-1] and used + size[n] > budget:
            out.append([])
            used = 0
        out[-1].append(n)
        used += size[n]
    return [c for c in out if c]


CHUNK_BYTES = 4 << 30  # exposed activations per run; the full-size LLM's FP32 weights (~6 GB) come on top


def walk_exposed(path: str | Path, samples: Callable[[], Iterable[dict[str, np.ndarray]]], names: list[str],
                 parts: list[list[str]] | None = None, chunk_bytes: int = CHUNK_BYTES,
                 threads: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(sample index, {name: value}) for every sample and chunk of `names` (intermediate tensors of the graph
    at `path`, exposed as extra outputs, <= chunk_bytes of them per run; a graph input is taken from the
    feeds). parts: the chunks, if the caller already planned them (plan_chunks). Each chunk walks all
    samples once, in order, so a tensor sees the samples in recording order.
    The side graph re-saved next to `path` references its external data (no weight copied); sessions run
    unoptimised (every tensor is the unfused graph's value), with no memory arena and no weight prepacking.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    if parts is None:
        parts = plan_chunks(model, samples, [n for n in names if n not in inputs], chunk_bytes)
    fed = [n for n in names if n in inputs]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False  # activations go back to the OS between runs, not to an arena
    so.add_session_config_entry("session.disable_prepacking", "1")  # no second copy of the weights
    if threads:
        so.intra_op_num_threads = threads
    if fed:
        for k, feeds in enumerate(samples()):
            yield k, {n: feeds[n] for n in fed}
    side = path.parent / f".ranges-{path.name}"
    try:
        for part in parts:
            m = onnx.ModelProto()
            m.CopyFrom(model)
            m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                  for n in part if n not in outputs)
            onnx.save_model(m, str(side))
            del m
            sess = ort.InferenceSession(str(side), so, providers=["CPUExecutionProvider"])
            for k, feeds in enumerate(samples()):
                yield k, dict(zip(part, sess.run(part, feeds), strict=True))
            del sess
    finally:
        side.unlink(missing_ok=True)


def plan_chunks(model: onnx.ModelProto, samples: Callable[[], Iterable[dict[str, np.ndarray]]], names: list[str],
                chunk_bytes: int) -> list[list[str]]:
    """`names` cut into runs of <= chunk_bytes of activations, per tensor the most over the samples'
    distinct input shapes (a decode step's KV cache is the largest input but has the smallest
    activations: input bytes do not tell which sample is largest)."""
    signatures = {tuple(sorted((k, x.shape) for k, x in f.items())) for f in samples()}
    size = dict.fromkeys(names, 0)
    for sig in signatures:
        for n, b in tensor_bytes(model, names, dict(sig)).items():
            size[n] = max(size[n], b)
    return chunks(names, size, chunk_bytes)


def measure(path: str | Path, samples: Callable[[], Iterable[dict[str, np.ndarray]]],
            chunk_bytes: int = CHUNK_BYTES, threads: int = 0) -> Ranges:
    """samples: a callable returning a fresh iterator of FP32 feeds (it is walked once per chunk)."""
    model = onnx.load(str(path), load_external_data=False)
    names, unknown = float_tensors(model)  # node outputs only: no graph input among them
    parts = plan_chunks(model, samples, names, chunk_bytes)
    res = Ranges(unmeasured=unknown, chunks=len(parts))
    del model
    seen: set[int] = set()
    for k, values in walk_exposed(path, samples, names, parts, threads=threads):
        seen.add(k)
        for n, x in values.items():
            res.tensors.setdefault(n, Range()).update(x)
    res.samples = len(seen)
    return res
