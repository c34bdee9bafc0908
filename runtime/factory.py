"""A runtime backend by its registry name (runtime/registry.py says which exist and checks the request).

The torch backends' modules pull in the model code (transformers' modeling, diffusers), torch-cuda CUDA
and trt TensorRT: each is imported here only when that backend is asked for, so the ort path never
loads them (tests/test_api.py: test_ort_path_imports_no_model_code).
"""

from __future__ import annotations

from pathlib import Path

from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.precision import Precision

from .backends import Backend, OrtBackend
from .cpu_isa import require_bf16
from .registry import check_request


def make_backend(name: str, model_dir: str | Path, artifacts: str | Path | None, cfg: JanusFlowConfig,
                 threads: int | None = None, vae_dir: str | Path | None = None,
                 precision: str = Precision.FP32) -> Backend:
    """A runtime backend by its registry name (runtime/registry.py checks the request first). vae_dir:
    the torch backends load the VAE from it (None: no vae_dec graph; add it later with add_vae)."""
    check_request(name, precision, artifacts)
    if name == "torch-cuda":
        from .torch_cuda import TorchCudaBackend

        return TorchCudaBackend(model_dir, vae_dir, precision)
    if name == "torch-fast":
        from .torch_backend import load_torch_backend

        if precision == Precision.BF16:
            require_bf16()
        return load_torch_backend(model_dir, vae_dir, threads, "cpu", precision)
    assert artifacts is not None  # check_request refused it
    if name == "ort":
        return OrtBackend(artifacts, cfg, threads, precision=precision)
    from .trt_backend import TrtBackend

    return TrtBackend(artifacts, cfg, precision)
