"""What the INT8 calibrators see: the recorded FP32 runtime inputs of one graph (calibration/record.py),
in recording order, checked against the graph's spec before a single one is fed."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Collection
from functools import lru_cache

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.calibrate import CalibrationMethod, HistogramCollector, TensorsData

from janusflow_trt.errors import CheckpointError, InputError

from .ranges import CHUNK_BYTES, walk_exposed

METHODS = ("minmax", "percentile", "entropy")
QUANT_OPS = ("MatMul", "Gemm", "Conv")  # what INT8 quantizes (export/int8.py): their activations are calibrated
MIN_PROMPTS = 2  # one prompt would set every gen_enc/gen_dec activation range from one image's trajectory


def check_inputs(inputs) -> None:
    """Refuse a calibration set too small to set INT8 ranges from (before anything is loaded)."""
    if len(inputs.prompts) < MIN_PROMPTS:
        raise InputError(f"INT8 calibration needs at least {MIN_PROMPTS} prompts, got {len(inputs.prompts)} "
                         "(--calib-prompts: one per line)")
    if not inputs.pairs:
        raise InputError("INT8 calibration needs at least one (photograph, question) pair (--calib-images)")


def check_sample(spec, feeds: dict[str, np.ndarray], where: str) -> None:
    """Refuse a recorded sample whose names, dtypes or fixed dims differ from the graph's spec."""
    want = {t.name: t for t in spec.inputs}
    if set(feeds) != set(want):
        raise CheckpointError(f"calibration data {where}: inputs {sorted(feeds)} != {spec.name}'s {sorted(want)}")
    for name, t in want.items():
        a = feeds[name]
        if a.dtype != np.dtype(t.dtype) or a.ndim != len(t.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(t.shape, a.shape, strict=True)):
            raise CheckpointError(f"calibration data {where}: {name} is {a.dtype}{list(a.shape)}, "
                                  f"{spec.name} expects {t.dtype}{list(t.shape)}")


class RecordedReader(CalibrationDataReader):
    """onnxruntime's CalibrationDataReader over CalibrationData.samples(graph, limit) (limit: at most this
    many samples, spread over the kinds of call; None: all)."""

    def __init__(self, calib, spec, limit: int | None = None):
        self.calib, self.spec, self.limit = calib, spec, limit
        self.rewind()

    def rewind(self) -> None:
        self._it = iter(self.calib.samples(self.spec.name, self.limit))
        self.seen, self.end = 0, None

    def __len__(self) -> int:
        return len(self.calib.select(self.spec.name, self.limit))

    def set_range(self, start_index: int, end_index: int) -> None:
        """ORT's strided calibration (CalibStridedMinMax) collects one window per call; windows come in order."""
        if start_index < self.seen:
            self.rewind()
        while self.seen < start_index:
            self.get_next()
        self.end = end_index

    def feeds(self):
        """A fresh pass over the samples (checked), for calibrators that walk them more than once."""
        self.rewind()
        while (f := self.get_next()) is not None:
            yield f

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.end is not None and self.seen >= self.end:
            return None
        feeds = next(self._it, None)
        if feeds is not None:
            check_sample(self.spec, feeds, f"{self.spec.name} sample {self.seen}")
            self.seen += 1
        return feeds


@lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    """AVX512-VNNI / AVX-VNNI: u8s8 dot products without the 16-bit saturation that reduce_range avoids."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# -- activation ranges, measured in chunks -----------------------------------------------------------
# ORT's own calibrators (quantize_static without a cache) hold the model proto twice and an ONNX Runtime
# session of it, and the histogram methods expose every calibrated tensor of a run at once: at full size one
# Euler-step LLM sample is ~7 GB of them, and the export was killed at 24.3 GB RSS. The same statistics are
# collected here over calibration/ranges.py's chunked, arena-free sessions, by ORT's own collector classes
# (HistogramCollector for percentile / entropy), each tensor seeing the samples in the same order, and
# handed to quantize_static through its calibration cache: it then runs no calibrator at all.
HISTOGRAM = {  # ORT create_calibrator's defaults per method (onnxruntime/quantization/calibrate.py)
    "percentile": dict(method="percentile", symmetric=True, num_bins=2048, num_quantized_bins=2048),
    "entropy": dict(method="entropy", symmetric=False, num_bins=128, num_quantized_bins=128),
}


def calibrated_tensors(model, skip: Collection[str] = ()) -> list[str]:
    """What quantize_static reads a range of: every float input of a MatMul / Gemm / Conv that is not an
    initializer, in graph order (ORT's own selection, CalibraterBase.select_tensors_to_calibrate, also takes
    their outputs; the export quantizes no output: export/int8.py flavour_options, OUTPUT_NOT_QUANTIZED).
    `model`: the graph proto (weights not needed), typed by shape inference here.
    skip: nodes the quantizer is told to keep float (a flavour's fixed plan: int8-cpu's attention products
    and Convs); a tensor only they read is not calibrated: quantize_static reads no range of it.
    At full size that is most of the LLM's exposed bytes (the 2x16x577x602 attention scores of every layer)."""
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.output, *g.input]}
    inits = {t.name for t in model.graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    skip = set(skip)
    out: dict[str, None] = {}
    for n in model.graph.node:
        if n.op_type in QUANT_OPS and n.name not in skip:
            for t in n.input:
                if t and t not in inits and types.get(t) in floats:
                    out[t] = None
    return list(out)


def tensor_ranges(path, samples, method: str, percentile: float, chunk_bytes: int | None = None,
                  skip: Collection[str] = ()):
    """-> onnxruntime.quantization TensorsData of the graph at `path` over `samples()` (a callable giving a
    fresh iterator of feeds), as ORT's calibrator of `method` computes it; skip: calibrated_tensors'."""
    names = calibrated_tensors(onnx.load(str(path), load_external_data=False), skip)
    walk = walk_exposed(path, samples, names, chunk_bytes=chunk_bytes or CHUNK_BYTES)
    if method == "minmax":  # MinMaxCalibrater: ReduceMin / ReduceMax per run, then nanmin / nanmax over runs
        lo: dict[str, np.ndarray] = {}
        hi: dict[str, np.ndarray] = {}
        for _, values in walk:
            for n, x in values.items():
                a, b = np.min(x), np.max(x)
                lo[n] = a if n not in lo else np.nanmin([lo[n], a])
                hi[n] = b if n not in hi else np.nanmax([hi[n], b])
        one = lambda v: np.asarray(v, np.float32).reshape(1)  # noqa: E731  (ORT's reduce outputs are [1])
        return TensorsData(CalibrationMethod.MinMax, {n: (one(lo[n]), one(hi[n])) for n in names if n in lo})
    if method not in HISTOGRAM:
        raise ValueError(f"unknown calibration method {method!r}")
    collector = HistogramCollector(percentile=percentile, scenario="same", **HISTOGRAM[method])
    with contextlib.redirect_stdout(io.StringIO()):  # the collector prints a line per call
        for _, values in walk:
            collector.collect({n: [x] for n, x in values.items()})
        result = collector.compute_collection_result()
    cal = CalibrationMethod.Percentile if method == "percentile" else CalibrationMethod.Entropy
    return TensorsData(cal, result)
