"""`--backend torch-cuda`: the export graph modules on the GPU in BF16 (FP16 on request), the GPU
baseline next to TensorRT and the way CUDA-graph capture is proven on a machine without TensorRT.

Each (graph, input shapes) gets static input buffers; the module call over them is captured once
(runtime/cuda_graph.py) and replayed. run() keeps the seam's numpy contract (one copy each way).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from janusflow_trt.export.specs import build_specs
from janusflow_trt.export.trt_build import require_cuda

from .cuda_graph import CapturedStep

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TorchCudaBackend:
    name = "torch-cuda"

    def __init__(self, model_dir: str | Path, vae_dir: str | Path | None = None, dtype: str = "bf16",
                 graphs_capture: bool = True):
        require_cuda("--backend torch-cuda")
        from janusflow_trt.export.graphs import EmbedGraph, GenDecGraph, GenEncGraph, LLMGraph, SigLIPGraph, VAEDecGraph
        from janusflow_trt.janusflow_ref.vae import load_vae
        from janusflow_trt.janusflow_ref.weights import load_model

        model = load_model(model_dir)
        self.cfg = model.cfg
        self.dtype = DTYPES[dtype]
        mods: dict[str, torch.nn.Module] = {
            "siglip": SigLIPGraph(model), "embed": EmbedGraph(model), "llm": LLMGraph(model),
            "llm_gen": LLMGraph(model, hidden_only=True), "gen_enc": GenEncGraph(model), "gen_dec": GenDecGraph(model)}
        if vae_dir is not None:
            mods["vae_dec"] = VAEDecGraph(load_vae(vae_dir))
        self.modules = {k: m.eval().to("cuda", self.dtype) for k, m in mods.items()}
        self.specs = build_specs(self.cfg)
        self.stream = torch.cuda.Stream()
        self.capture = graphs_capture
        self.static: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor], Callable, CapturedStep | None]] = {}

    def _slot(self, graph: str, shapes: tuple[tuple[int, ...], ...]):
        key = (graph, shapes)
        if key not in self.static:
            spec = self.specs[graph]
            ins = [torch.empty(s, device="cuda", dtype=self.dtype if t.dtype == "float32" else torch.int64)
                   for t, s in zip(spec.inputs, shapes, strict=True)]
            outs: list[torch.Tensor] = []

            @torch.inference_mode()
            def work(stream: torch.cuda.Stream) -> None:
                with torch.cuda.stream(stream):
                    res = self.modules[graph](*ins)
                    outs[:] = list(res) if isinstance(res, tuple) else [res]

            self.static[key] = (ins, outs, work, CapturedStep(work, self.stream) if self.capture else None)
        return self.static[key]

    device = torch.device("cuda")
    capturable = True  # the decode step is captured per KV bucket (runtime/decode.py)

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        """The decode loop's device cache in the modules' dtype (numpy has no bf16 for the host cache)."""
        return self.dtype

    @torch.inference_mode()
    def run_tensors(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Device tensors in and out on the current stream; floating inputs cast to the module dtype
        (the FP32 boundary of the specs), outputs as the module computes them."""
        args = [feeds[n].to(self.dtype) if feeds[n].is_floating_point() else feeds[n]
                for n in self.specs[graph].input_names]
        res = self.modules[graph](*args)
        return dict(zip(self.specs[graph].output_names, res if isinstance(res, tuple) else (res,), strict=True))

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[graph]
        ins, outs, work, step = self._slot(graph, tuple(tuple(feeds[t.name].shape) for t in spec.inputs))
        for buf, t in zip(ins, spec.inputs, strict=True):
            buf.copy_(torch.from_numpy(np.ascontiguousarray(feeds[t.name])))
        torch.cuda.current_stream().synchronize()  # the copies above ran on the default stream
        step() if step is not None else work(self.stream)
        self.stream.synchronize()
        return {t.name: o.float().cpu().numpy() for t, o in zip(spec.outputs, outs, strict=True)}
