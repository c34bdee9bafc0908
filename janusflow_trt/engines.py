"""What a Pipeline runs, one class per kind, the same calls each: answer tokens, the generation
prompt's prefix, the Euler steps over it, the VAE (ensure_vae first). Chosen once in
Pipeline.from_pretrained from the backend registry (runtime/registry.py), so no call branches on it.

- ReferenceEngine: the official-style eager pipeline (`torch`): HF cache for chat, the whole prompt
  recomputed at every Euler step (janusflow_ref).
- RuntimeEngine: our pipelines over the backend seam (every other backend): one KV cache on the
  backend's device, prefix prefilled once, the decode and Euler step functions (runtime/).
The VAE is loaded on the first generate, once: chat alone needs none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from janusflow_trt.janusflow_ref import generation as ref_gen
from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.janusflow_ref.processor import ChatInputs, Processor
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.janusflow_ref.understanding import chat_tokens as ref_chat_tokens
from janusflow_trt.runtime import text2img
from janusflow_trt.runtime.backends import Backend, physical_cores
from janusflow_trt.runtime.chat import chat_tokens
from janusflow_trt.runtime.euler_step import euler_loop
from janusflow_trt.runtime.factory import make_backend
from janusflow_trt.runtime.registry import check_request


class ReferenceEngine:
    def __init__(self, model, processor: Processor, vae_loader: Callable[[], Any]):
        self.model, self.processor, self._vae_loader = model, processor, vae_loader
        self._vae: Any = None

    def chat_tokens(self, inputs: ChatInputs, params: SamplingParams) -> Iterator[int]:
        return ref_chat_tokens(self.model, inputs, params, self.processor.eos_id)

    def prefix(self, prompt: str, num_images: int):
        return ref_gen.prompt_prefix(self.model, self.processor, prompt, num_images)

    def euler(self, prefix, z0: torch.Tensor, steps: int, cfg_weight: float) -> Iterator[torch.Tensor]:
        embeds, mask = prefix
        return ref_gen.euler_steps(self.model, embeds, mask, z0, steps, cfg_weight)

    def ensure_vae(self) -> None:
        if self._vae is None:
            self._vae = self._vae_loader()

    def vae(self, z: torch.Tensor) -> torch.Tensor:
        return ref_gen.vae_decode(self._vae, z)


class RuntimeEngine:
    def __init__(self, backend: Backend, cfg: JanusFlowConfig, processor: Processor,
                 add_vae: Callable[[], None] | None = None):
        """add_vae: gives the backend its vae_dec graph on first use (torch-fast loads the VAE weights;
        ort / trt have it among their artifacts)."""
        self.backend, self.cfg, self.processor, self._add_vae = backend, cfg, processor, add_vae

    def chat_tokens(self, inputs: ChatInputs, params: SamplingParams) -> Iterator[int]:
        return chat_tokens(self.backend, self.cfg, inputs, params, self.processor.eos_id)

    def prefix(self, prompt: str, num_images: int):
        return text2img.prefill_prefix(self.backend, self.cfg, self.processor, prompt, num_images)

    def euler(self, cache, z0: torch.Tensor, steps: int, cfg_weight: float) -> Iterator[torch.Tensor]:
        """The loop on the backend's device (runtime/euler_step.py): yields the device z, read by nobody
        unless the caller asks (Pipeline.generate's callback)."""
        return euler_loop(self.backend, cache, z0, steps, cfg_weight)

    def ensure_vae(self) -> None:
        if self._add_vae is not None:
            self._add_vae()
            self._add_vae = None

    def vae(self, z: torch.Tensor) -> torch.Tensor:
        return text2img.vae_decode(self.backend, z)


def build_engine(backend: str, model_dir: Path, cfg: JanusFlowConfig, processor: Processor,
                 artifacts: Path | None, vae_dir: Path | None, threads: int | None, precision: str = "fp32"):
    """Loads the weights (torch, torch-fast, torch-cuda) or opens the artifacts (ort, trt): the one load
    of a Pipeline. The ort / trt path loads no model weights."""
    info = check_request(backend, precision, artifacts)
    if info.needs_artifacts:  # ort / trt: the VAE is among the artifacts
        return RuntimeEngine(make_backend(backend, model_dir, artifacts, cfg, threads, None, precision), cfg, processor)
    # lazy, deliberately: the model code (transformers' modeling, diffusers) is loaded only by the
    # backends that run the checkpoint's weights, never on the ort / trt path
    from janusflow_trt.janusflow_ref.vae import load_vae, resolve_vae_dir
    from janusflow_trt.janusflow_ref.weights import load_model
    from janusflow_trt.runtime.torch_backend import TorchBackend

    if backend == "torch-cuda":  # weights and VAE on the GPU at load
        return RuntimeEngine(make_backend(backend, model_dir, None, cfg, threads, resolve_vae_dir(model_dir, vae_dir),
                                          precision), cfg, processor)

    def load_vae_now():
        return load_vae(resolve_vae_dir(model_dir, vae_dir))

    if backend == "torch":
        torch.set_num_threads(threads or physical_cores())
        return ReferenceEngine(load_model(model_dir), processor, load_vae_now)
    b = make_backend(backend, model_dir, None, cfg, threads, None, precision)  # torch-fast: FP32 or BF16
    assert isinstance(b, TorchBackend)
    return RuntimeEngine(b, cfg, processor, add_vae=lambda: b.add_vae(load_vae_now()))
