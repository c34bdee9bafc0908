"""Range measurement: every float tensor of an FP32 ONNX graph over the calibration samples.

The graph is re-saved next to the original (so external data still resolves, and no weight is
copied) with chosen intermediate tensors added as outputs, in chunks of `chunk` tensors so that the
exposed activations of one run stay bounded in memory; ONNX Runtime runs it unoptimised, so every
tensor is the value the unfused graph computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

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


def measure(path: str | Path, samples: Callable[[], Iterable[dict[str, np.ndarray]]], chunk: int = 256,
            threads: int = 0) -> Ranges:
    """samples: a callable returning a fresh iterator of FP32 feeds (it is walked once per chunk)."""
    import onnxruntime as ort

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names, unknown = float_tensors(model)
    res = Ranges(unmeasured=unknown)
    outputs = {o.name for o in model.graph.output}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    side = path.parent / f".ranges-{path.name}"
    try:
        for i in range(0, len(names), chunk):
            part = names[i:i + chunk]
            m = onnx.ModelProto()
            m.CopyFrom(model)
            m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                  for n in part if n not in outputs)
            onnx.save_model(m, str(side))
            del m
            sess = ort.InferenceSession(str(side), so, providers=["CPUExecutionProvider"])
            count = 0
            for feeds in samples():
                for n, x in zip(part, sess.run(part, feeds), strict=True):
                    res.tensors.setdefault(n, Range()).update(x)
                count += 1
            res.samples = count
            del sess
    finally:
        side.unlink(missing_ok=True)
    return res
