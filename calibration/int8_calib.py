"""What the INT8 calibrators see: the recorded FP32 runtime inputs of one graph (calibration/record.py),
in recording order, checked against the graph's spec before a single one is fed."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from janusflow_trt.janusflow_ref.errors import CheckpointError, InputError

METHODS = ("minmax", "percentile", "entropy")
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
