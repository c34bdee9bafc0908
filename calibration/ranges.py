"""Range measurement: every float tensor of an FP32 ONNX graph over the calibration samples.

`measure` (the FP16 ranges) computes each tensor's figures inside the graph: per tensor a few nodes
(Abs and three reductions of it; masks counted only where a value is non-finite or below FP16's
smallest subnormal) whose outputs are scalars, so one run per sample reads every tensor, and ONNX
Runtime frees each activation once its last reader has run (at full size the LLM's weights plus one
run's live activations, instead of holding gigabytes of exposed tensors).
The statistics graph is saved next to the original (so external data still resolves, no weight copied)
and runs unoptimised, so every tensor is the value the unfused graph computes.

`measure(channels=)` also reduces chosen tensors per last-axis channel (SmoothQuant's maxima) in the
same runs. `walk_exposed` hands whole tensors to Python (the INT8 histograms need them): chosen
intermediate tensors added as outputs, in chunks of at most `chunk_bytes` of exposed activations per run
(ONNX Runtime holds every requested output until the run ends; at full size one Euler-step LLM sample has
~14 GB of them: 2 rows x 577 tokens, attention scores 2x16x577x602 fp32 = 44 MB each), sized by shape
inference on the largest sample's input shapes.
Every chunk walks all samples once, so the cost is chunks x samples runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
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

    def add(self, absmax: float, nonzero: int, flushed: int, nonfinite: int) -> None:
        """One run's figures of the tensor (from stats_model's outputs): absmax over its finite values (0
        when none), counts of nonzero values, of those FP16 flushes to zero, and of NaN / inf values."""
        if np.isfinite(absmax):  # ReduceMax over an empty tensor gives -inf
            self.absmax = max(self.absmax, float(absmax))
        self.nonzero += int(nonzero)
        self.flushed += int(flushed)
        self.nonfinite += int(nonfinite)

    @property
    def flush_fraction(self) -> float:
        return self.flushed / self.nonzero if self.nonzero else 0.0


@dataclass
class Ranges:
    tensors: dict[str, Range] = field(default_factory=dict)
    samples: int = 0
    unmeasured: list[str] = field(default_factory=list)  # outputs of unknown type (shape inference gave none)
    chunks: int = 0  # runs per sample
    channels: dict[str, np.ndarray] = field(default_factory=dict)  # measure(channels=): max |x| per last-axis channel


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


CHUNK_BYTES = 2 << 30  # exposed activations per run; the full-size LLM's FP32 weights (~6 GB) come on top


def lean_options(threads: int = 0) -> ort.SessionOptions:
    """Unoptimised (every tensor is the unfused graph's value), no memory arena, no weight prepacking."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False  # activations go back to the OS between runs, not to an arena
    so.add_session_config_entry("session.disable_prepacking", "1")  # no second copy of the weights
    if threads:
        so.intra_op_num_threads = threads
    return so


def walk_exposed(path: str | Path, samples: Callable[[], Iterable[dict[str, np.ndarray]]], names: list[str],
                 parts: list[list[str]] | None = None, chunk_bytes: int = CHUNK_BYTES,
                 threads: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(sample index, {name: value}) for every sample and chunk of `names` (intermediate tensors of the graph
    at `path`, exposed as extra outputs, <= chunk_bytes of them per run; a graph input is taken from the
    feeds). parts: the chunks, if the caller already planned them (plan_chunks). Each chunk walks all
    samples once, in order, so a tensor sees the samples in recording order.
    The side graph re-saved next to `path` references its external data (no weight copied); sessions run
    unoptimised (every tensor is the unfused graph's value), with no memory arena and no weight prepacking.
    Each yielded dict is emptied when the next is asked for: a caller keeps what it needs by copying it.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    if parts is None:
        parts = plan_chunks(model, samples, [n for n in names if n not in inputs], chunk_bytes)
    fed = [n for n in names if n in inputs]
    so = lean_options(threads)
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
                values = dict(zip(part, sess.run(part, feeds), strict=True))
                yield k, values
                # the caller's loop variable still names this dict while the next run allocates its
                # outputs: emptied here, one chunk's tensors are alive at a time, not two (at full size
                # 2 GB less at the int8-cpu walk's peak)
                values.clear()
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


STATS = ("absmax", "size", "zeros", "below", "finite")  # stats_model's outputs per tensor, in order


def stats_model(model: onnx.ModelProto, names: list[str],
                channels: Sequence[str] = ()) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` (a proto loaded without external data) that also outputs, per float tensor of
    `names`, the STATS as scalars (len(STATS) per name, in order): max |x| over the finite values (0 when
    none; -inf for an empty tensor), the element count, and the counts of |x| == 0, of |x| < FP16_TINY / 2
    (zeros included) and of |x| < inf (NaN is neither). Counts are int32 (a tensor is < 2**31 elements).
    Then per tensor of `channels` its max |x| per last-axis channel over every other axis (a [C] vector:
    SmoothQuant's input; a NaN may be skipped, as ONNX Runtime's ReduceMax does at some positions).

    Most tensors have every value finite and none below FP16_TINY / 2 (0 included): three reductions of
    |x| (max, min, sum: a NaN or inf makes the sum non-finite) tell so, and then the counts are known
    without counting (zeros = below = 0, finite = size; a sum that overflows only sends a tensor down the
    exact path). Nested Ifs per tensor run the masks only where needed: a finite tensor with small values
    counts its zeros and those below (compare, cast, sum each); one with a NaN or inf also counts its
    finite values and takes their maximum (Where + ReduceMax)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g, mk, T, h = m.graph, onnx.helper.make_node, onnx.TensorProto, onnx.helper
    g.initializer.extend([h.make_tensor(f"rs.{k}", T.FLOAT, [], [v]) for k, v in
                          (("zero", 0.0), ("half_tiny", FP16_TINY / 2), ("inf", np.inf))])
    g.initializer.extend([h.make_tensor("rs.none", T.INT32, [], [0]), h.make_tensor("rs.rows", T.INT64, [1], [-1]),
                          h.make_tensor("rs.axis0", T.INT64, [1], [0])])
    stats: dict[str, list[onnx.NodeProto]] = {}
    outs: list[str] = []
    types = (T.FLOAT, T.INT64, T.INT32, T.INT32, T.INT32)

    def count(op: str, a: str, bound: str, out: str) -> list[onnx.NodeProto]:
        """out = the number of elements where op(a, rs.<bound>) holds."""
        mask = f"{out}.mask"
        return [mk(op, [a, f"rs.{bound}"], [mask]), mk("Cast", [mask], [mask + "32"], to=T.INT32),
                mk("ReduceSum", [mask + "32"], [out], keepdims=0)]

    def branch(name: str, nodes: list[onnx.NodeProto], results: list[str]) -> onnx.GraphProto:
        return h.make_graph(nodes, name, [], [h.make_tensor_value_info(r, t, []) for r, t in
                                              zip(results, (T.FLOAT, T.INT32, T.INT32, T.INT32), strict=True)])

    for i, n in enumerate(names):
        p = f"rs.{i}."
        o = [f"{p}{k}" for k in STATS]
        a = p + "abs"
        size32 = [mk("Cast", [o[1]], [p + "size32"], to=T.INT32)]
        plain = branch(f"rs_{i}_plain", [mk("Identity", [p + "max"], [p + "p.max"]),
                                         mk("Identity", ["rs.none"], [p + "p.zeros"]),
                                         mk("Identity", ["rs.none"], [p + "p.below"]),
                                         mk("Identity", [p + "size32"], [p + "p.finite"])],
                       [p + "p.max", p + "p.zeros", p + "p.below", p + "p.finite"])
        small = branch(f"rs_{i}_small", [mk("Identity", [p + "max"], [p + "s.max"]),
                                         *count("Equal", a, "zero", p + "s.zeros"),
                                         *count("Less", a, "half_tiny", p + "s.below"),
                                         mk("Identity", [p + "size32"], [p + "s.finite"])],
                       [p + "s.max", p + "s.zeros", p + "s.below", p + "s.finite"])
        finite = branch(f"rs_{i}_finite", [mk("If", [p + "large?"], [p + "f.max", p + "f.zeros", p + "f.below",
                                                                     p + "f.finite"],
                                              then_branch=plain, else_branch=small)],
                        [p + "f.max", p + "f.zeros", p + "f.below", p + "f.finite"])
        counted = branch(f"rs_{i}_counted", [*count("Equal", a, "zero", p + "c.zeros"),
                                             *count("Less", a, "half_tiny", p + "c.below"),
                                             *count("Less", a, "inf", p + "c.finite"),
                                             mk("Where", [p + "c.finite.mask", a, "rs.zero"], [p + "fin"]),
                                             mk("ReduceMax", [p + "fin"], [p + "c.max"], keepdims=0)],
                         [p + "c.max", p + "c.zeros", p + "c.below", p + "c.finite"])
        stats[n] = [mk("Abs", [n], [a]), mk("Size", [n], [o[1]]), *size32,
                    mk("ReduceMax", [a], [p + "max"], keepdims=0), mk("ReduceMin", [a], [p + "min"], keepdims=0),
                    mk("ReduceSum", [a], [p + "sum"], keepdims=0),
                    mk("Less", [p + "sum", "rs.inf"], [p + "finite?"]),  # NaN and inf: False
                    mk("Less", [p + "min", "rs.half_tiny"], [p + "small?"]),
                    mk("Not", [p + "small?"], [p + "large?"]),
                    mk("If", [p + "finite?"], [o[0], o[2], o[3], o[4]], then_branch=finite, else_branch=counted)]
        g.output.extend(h.make_tensor_value_info(x, t, []) for x, t in zip(o, types, strict=True))
        outs += o
    index = {n: i for i, n in enumerate(names)}
    for j, n in enumerate(channels):  # |x| as [rows, C], then the max down the rows (ReduceMax-18: axes input)
        p = f"rs.ch{j}."
        a = f"rs.{index[n]}.abs" if n in index else p + "abs"  # a tensor with FP16 figures has its |x| already
        stats.setdefault(n, []).extend([
            *([] if n in index else [mk("Abs", [n], [a])]), mk("Shape", [n], [p + "c"], start=-1),
            mk("Concat", ["rs.rows", p + "c"], [p + "2d"], axis=0), mk("Reshape", [a, p + "2d"], [p + "rows"]),
            mk("ReduceMax", [p + "rows", "rs.axis0"], [p + "max"], keepdims=0)])
        g.output.append(h.make_tensor_value_info(p + "max", T.FLOAT, [None]))
        outs.append(p + "max")
    # each tensor's statistics right after its producer in the node list (a graph input's first): run in that
    # order (PRIORITY_BASED breaks ties by node index), a tensor is reduced as soon as it exists and freed once
    # its own readers ran
    nodes = list(g.node)
    del g.node[:]
    for i in g.input:
        g.node.extend(stats.get(i.name, ()))
    for node in nodes:
        g.node.append(node)
        for x in node.output:
            g.node.extend(stats.get(x, ()))
    return m, outs


def measure(path: str | Path, samples: Callable[[], Iterable[dict[str, np.ndarray]]], threads: int = 0,
            channels: Sequence[str] = (), ranges: bool = True) -> Ranges:
    """samples: a callable returning a fresh iterator of FP32 feeds. One run per sample of the statistics
    graph (stats_model) saved next to `path`: unoptimised, no weight prepacking. ranges: every float
    tensor's figures (the FP16 ranges); channels: these tensors' max |x| per last-axis channel over every
    sample too (Ranges.channels, float64; SmoothQuant's, export/smoothquant.py: channel_absmax), measured in
    the same runs."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names, unknown = float_tensors(model) if ranges else ([], [])  # node outputs only: no graph input
    stats, outs = stats_model(model, names, channels)
    del model
    res = Ranges(unmeasured=unknown, chunks=1)
    side = path.parent / f".ranges-{path.name}"
    try:
        onnx.save_model(stats, str(side))
        del stats
        so = lean_options(threads)
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # the node list's order (stats_model)
        # with the arena: the outputs are scalars, so it holds one run's live activations, which it reuses
        # across the ~1700 tensors and their masks a full-size LLM sample reduces. Without it (and the
        # export's 1 MB mmap threshold, export/memory.py) each of those buffers was a fresh mapping, and its
        # page faults cost more than the graph: 36 s a sample there, 12 s here, peak RSS the same (6.9 GB)
        so.enable_cpu_mem_arena = True
        sess = ort.InferenceSession(str(side), so, providers=["CPUExecutionProvider"])
        for feeds in samples():
            values = sess.run(outs, feeds)
            for k, n in enumerate(names):
                v = values[len(STATS) * k:len(STATS) * (k + 1)]
                size, zeros, below, finite = (int(x) for x in v[1:])
                res.tensors.setdefault(n, Range()).add(float(v[0]), size - zeros, below - zeros, size - finite)
            for n, c in zip(channels, values[len(STATS) * len(names):], strict=True):
                c = np.asarray(c, np.float64)
                res.channels[n] = c if n not in res.channels else np.maximum(res.channels[n], c)
            res.samples += 1
    finally:
        side.unlink(missing_ok=True)
    return res
