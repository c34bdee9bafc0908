"""Which backends exist: the one list the CLI, the API, the backend factory and their error messages read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from janusflow_trt.errors import InputError
from janusflow_trt.precision import Precision


@dataclass(frozen=True)
class BackendInfo:
    name: str
    help: str
    needs_artifacts: bool  # runs an export directory (--artifacts) rather than the checkpoint's weights
    precisions: tuple[Precision, ...]  # the exported variants it runs
    gpu: bool  # needs an NVIDIA GPU


_EXPORTED = tuple(Precision)
BACKENDS: dict[str, BackendInfo] = {b.name: b for b in (
    BackendInfo("torch", "the official-style eager reference (janusflow_ref)", False, (Precision.FP32,), False),
    BackendInfo("torch-fast", "our runtime over the eager graph modules", False, (Precision.FP32,), False),
    BackendInfo("ort", "ONNX Runtime over --artifacts (CPU; CUDA with onnxruntime-gpu)", True, _EXPORTED, False),
    BackendInfo("trt", "TensorRT engines from `janusflow build` over --artifacts", True,
                (Precision.FP32, Precision.FP16, Precision.INT8), True),
    BackendInfo("torch-cuda", "the graph modules in BF16 on the GPU with CUDA graphs", False, (Precision.FP32,), True),
)}


def check_request(backend: str, precision: str, artifacts: str | Path | None) -> BackendInfo:
    """The backend, refused in one line if unknown, if it does not run `precision`, or if it needs an
    export directory that was not given."""
    info = BACKENDS.get(backend)
    if info is None:
        raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if precision not in tuple(Precision):
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(Precision)}")
    if precision not in info.precisions:
        runs = [b.name for b in BACKENDS.values() if precision in b.precisions]
        raise InputError(f"precision {precision} runs exported graphs: use backend {' or '.join(runs)} "
                         f"({backend} runs {', '.join(info.precisions)})")
    if info.needs_artifacts and artifacts is None:
        raise InputError(f"backend {backend} needs an export directory (--artifacts DIR / artifacts=)")
    return info
