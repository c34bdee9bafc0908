"""The torch backends: the export graph modules (export/graphs.py) run eagerly by torch, behind the seam.

One class for `torch-fast` (CPU) and `torch-cuda` (runtime/torch_cuda.py: the same class on CUDA, with a
stream, so the step functions capture it): a device and a dtype.
- FP32: the modules as loaded; run() passes the feeds through untouched.
- BF16 (the checkpoint's published dtype): the model's weights cast once at load; run() casts the
  floating feeds to BF16 except FP32_FEEDS. What stays FP32, and why:
  * the Euler carry and update: gen_dec's z, cfg_weight and dt are FP32, so the CFG combination and
    z + dt * v promote to FP32 (v itself comes out of the decoder in BF16);
  * the timestep: gen_enc's t and its sin/cos argument t x freqs (the frequency table is registered
    after the cast, so it stays FP32: the FP16 variant's measured sin/cos rule, docs/precision.md);
    the timestep MLP runs in BF16, as the FP16 variant runs it in FP16;
  * norms: LlamaRMSNorm computes in FP32 itself; LayerNorm / GroupNorm / SDPA's softmax accumulate
    in FP32 inside torch's BF16 kernels;
  * logits (the LLM graph returns .float()), the KV cache in BF16 (kv_dtype);
  * the VAE: FP32 (vae_dec's latents in FP32), as the issue asks until BF16 is measured to hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from janusflow_trt.export.graphs import EmbedGraph, GenDecGraph, GenEncGraph, LLMGraph, SigLIPGraph, VAEDecGraph
from janusflow_trt.export.specs import build_specs
from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.janusflow_ref.vae import load_vae
from janusflow_trt.janusflow_ref.weights import load_model
from janusflow_trt.precision import Precision

from .backends import physical_cores

DTYPES = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16}
# feeds that stay FP32 in a BF16 backend (see the module docstring); vae_dec: the VAE stays FP32
FP32_FEEDS = {"gen_enc": {"t"}, "gen_dec": {"z", "cfg_weight", "dt"}, "vae_dec": {"latents"}}


def graph_modules(model, vae=None) -> dict[str, Any]:
    """The export graph modules of a loaded model (and VAE): what the torch backends run."""
    mods = {"siglip": SigLIPGraph(model), "embed": EmbedGraph(model), "llm": LLMGraph(model),
            "llm_gen": LLMGraph(model, hidden_only=True), "gen_enc": GenEncGraph(model), "gen_dec": GenDecGraph(model)}
    if vae is not None:
        mods["vae_dec"] = VAEDecGraph(vae)
    return mods


class TorchBackend:
    """Runs the export graph modules eagerly on `device` in `dtype` (FP32 or BF16)."""

    def __init__(self, model, vae=None, threads: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        """model: cast to `device` / `dtype` IN PLACE (one copy of the weights); vae: moved, kept FP32.
        On CUDA, run() enqueues on the current stream and the backend is capturable (its own stream)."""
        assert dtype in DTYPES.values(), f"TorchBackend runs {list(DTYPES.values())}, not {dtype}"
        self.device, self.dtype = torch.device(device), dtype
        cuda = self.device.type == "cuda"
        self.name = "torch-cuda" if cuda else "torch-fast"
        self.capturable = cuda  # run() enqueues on the current stream over the given buffers
        self.stream = torch.cuda.Stream() if cuda else None
        self.kv_dtype = dtype  # the cache in the modules' dtype
        if not cuda:
            torch.set_num_threads(threads or physical_cores())
        self.cfg: JanusFlowConfig = model.cfg
        model.to(self.device, dtype)  # before graph_modules: gen_enc's frequency table is made FP32 after it
        self.modules: dict[str, Any] = {k: m.to(self.device) for k, m in graph_modules(model).items()}
        self.specs = build_specs(self.cfg)
        # per graph: the floating input names cast to self.dtype in run() (none in FP32)
        self.casts = {g: set() if dtype == torch.float32 else
                      {t.name for t in s.inputs if t.dtype == "float32"} - FP32_FEEDS.get(g, set())
                      for g, s in self.specs.items()}
        if vae is not None:
            self.add_vae(vae)

    def add_vae(self, vae) -> None:
        self.modules["vae_dec"] = VAEDecGraph(vae.to(self.device))

    @torch.inference_mode()
    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors on self.device in and out (outputs as the module computes them: BF16 hidden states
        in a BF16 backend, FP32 logits and z_next)."""
        cast = self.casts[graph]
        args = [feeds[n].to(self.dtype) if n in cast else feeds[n] for n in self.specs[graph].input_names]
        res = self.modules[graph](*args)
        res = res if isinstance(res, tuple) else (res,)
        return dict(zip(self.specs[graph].output_names, res, strict=True))

    def graph_file(self, graph: str) -> Path | None:
        return None


def load_torch_backend(model_dir: str | Path, vae_dir: str | Path | None, threads: int | None,
                       device: str = "cpu", precision: str = Precision.FP32) -> TorchBackend:
    return TorchBackend(load_model(model_dir), load_vae(vae_dir) if vae_dir is not None else None, threads,
                        device, DTYPES[Precision(precision)])
