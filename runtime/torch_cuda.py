"""`--backend torch-cuda`: the torch backend (runtime/torch_backend.py) on the GPU, BF16 by default.

Everything but the capture is TorchBackend's own code, exercised on the CPU (tests/test_bf16.py runs the
same class in BF16 there); on CUDA it is capturable with a stream of its own, so the step functions'
StepRunner captures whole decode and Euler steps as CUDA graphs (runtime/cuda_graph.py).
"""

from __future__ import annotations

from pathlib import Path

from janusflow_trt.export.trt_build import require_cuda
from janusflow_trt.precision import Precision

from .torch_backend import TorchBackend, load_torch_backend


def TorchCudaBackend(model_dir: str | Path, vae_dir: str | Path | None = None,  # noqa: N802 (a constructor)
                     precision: str = Precision.BF16) -> TorchBackend:
    require_cuda("--backend torch-cuda")
    return load_torch_backend(model_dir, vae_dir, None, "cuda", precision)
