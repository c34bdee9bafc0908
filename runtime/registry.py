"""Which backends exist: the one list the CLI, the API, the backend factory and their error messages read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from janusflow_trt.errors import InputError
from janusflow_trt.precision import EXPORTED, Precision


@dataclass(frozen=True)
class BackendInfo:
    name: str
    help: str
    needs_artifacts: bool  # runs an export directory (--artifacts) rather than the checkpoint's weights
    precisions: tuple[Precision, ...]  # what it runs: exported variants (ort, trt) or dtypes (torch-*)
    gpu: bool  # needs an NVIDIA GPU


_BF16_TORCH = (Precision.FP32, Precision.BF16)  # the graph modules' dtype (bf16: weights cast at load)
BACKENDS: dict[str, BackendInfo] = {b.name: b for b in (
    BackendInfo("torch", "the official-style eager reference (janusflow_ref)", False, (Precision.FP32,), False),
    BackendInfo("torch-fast", "our runtime over the eager graph modules on the CPU (bf16: needs AVX-512 BF16 or AMX)",
                False, _BF16_TORCH, False),
    BackendInfo("ort", "ONNX Runtime over --artifacts (CPU; CUDA with onnxruntime-gpu)", True, EXPORTED, False),
    BackendInfo("trt", "TensorRT engines from `janusflow build` over --artifacts", True,
                (Precision.FP32, Precision.FP16, Precision.INT8), True),
    BackendInfo("torch-cuda", "the graph modules on the GPU (fp32 or bf16) with CUDA graphs", False, _BF16_TORCH,
                True),
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
        kind = "an exported graph variant" if precision in EXPORTED else "a torch-backend dtype, not exported"
        raise InputError(f"backend {backend} runs {', '.join(info.precisions)}; precision {precision} ({kind}) "
                         f"runs on {' or '.join(runs)}")
    if info.needs_artifacts and artifacts is None:
        raise InputError(f"backend {backend} needs an export directory (--artifacts DIR / artifacts=)")
    return info
