"""`--backend torch-fast`: the export graph modules (export/graphs.py) eager on the CPU, behind the seam."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from janusflow_trt.export.graphs import EmbedGraph, GenDecGraph, GenEncGraph, LLMGraph, SigLIPGraph, VAEDecGraph
from janusflow_trt.export.specs import build_specs
from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.janusflow_ref.vae import load_vae
from janusflow_trt.janusflow_ref.weights import load_model

from .backends import physical_cores


def graph_modules(model, vae=None) -> dict[str, Any]:
    """The export graph modules of a loaded model (and VAE): what the torch backends run."""
    mods = {"siglip": SigLIPGraph(model), "embed": EmbedGraph(model), "llm": LLMGraph(model),
            "llm_gen": LLMGraph(model, hidden_only=True), "gen_enc": GenEncGraph(model), "gen_dec": GenDecGraph(model)}
    if vae is not None:
        mods["vae_dec"] = VAEDecGraph(vae)
    return mods


class TorchBackend:
    """Runs the export graph modules eagerly on the CPU."""

    name = "torch-fast"
    device = torch.device("cpu")
    kv_dtype = torch.float32
    capturable, stream = False, None

    def __init__(self, model, vae=None, threads: int | None = None):
        torch.set_num_threads(threads or physical_cores())
        self.cfg: JanusFlowConfig = model.cfg
        self.modules: dict[str, Any] = graph_modules(model, vae)
        self.specs = build_specs(self.cfg)

    def add_vae(self, vae) -> None:
        self.modules["vae_dec"] = VAEDecGraph(vae)

    @torch.inference_mode()
    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        res = self.modules[graph](*[feeds[n] for n in self.specs[graph].input_names])
        res = res if isinstance(res, tuple) else (res,)
        return dict(zip(self.specs[graph].output_names, res, strict=True))

    def graph_file(self, graph: str) -> Path | None:
        return None


def load_torch_backend(model_dir: str | Path, vae_dir: str | Path | None, threads: int | None) -> TorchBackend:
    return TorchBackend(load_model(model_dir), load_vae(vae_dir) if vae_dir is not None else None, threads)
