"""`--backend torch-cuda`: the export graph modules on the GPU in BF16 (FP16 on request), the GPU
baseline next to TensorRT and the way CUDA-graph capture is proven on a machine without TensorRT.
run() calls the modules on the current stream; the step functions' StepRunner captures whole steps
(runtime/cuda_graph.py), so nothing here captures per graph.
"""

from __future__ import annotations

from pathlib import Path

import torch

from janusflow_trt.export.specs import build_specs
from janusflow_trt.export.trt_build import require_cuda
from janusflow_trt.janusflow_ref.vae import load_vae
from janusflow_trt.janusflow_ref.weights import load_model

from .torch_backend import graph_modules

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TorchCudaBackend:
    name = "torch-cuda"
    device = torch.device("cuda")
    capturable = True  # run() enqueues on the current stream over the given buffers

    def __init__(self, model_dir: str | Path, vae_dir: str | Path | None = None, dtype: str = "bf16"):
        require_cuda("--backend torch-cuda")
        model = load_model(model_dir)
        self.cfg = model.cfg
        self.dtype = DTYPES[dtype]
        self.kv_dtype = self.dtype  # the device cache in the modules' dtype
        mods = graph_modules(model, load_vae(vae_dir) if vae_dir is not None else None)
        self.modules = {k: m.eval().to("cuda", self.dtype) for k, m in mods.items()}
        self.specs = build_specs(self.cfg)
        self.stream = torch.cuda.Stream()

    def graph_file(self, graph: str) -> Path | None:
        return None

    @torch.inference_mode()
    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Device tensors in and out on the current stream; floating inputs cast to the module dtype
        (the FP32 boundary of the specs), outputs as the module computes them."""
        args = [feeds[n].to(self.dtype) if feeds[n].is_floating_point() else feeds[n]
                for n in self.specs[graph].input_names]
        res = self.modules[graph](*args)
        return dict(zip(self.specs[graph].output_names, res if isinstance(res, tuple) else (res,), strict=True))
