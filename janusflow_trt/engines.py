"""What a Pipeline runs, one class per kind, the same calls each: answer tokens, the generation
prompt's prefix, the Euler steps over it, the VAE (ensure_vae first). Chosen once in
Pipeline.from_pretrained, so no call branches on the backend.

- ReferenceEngine: the official-style eager pipeline (`torch`): HF cache for chat, the whole prompt
  recomputed at every Euler step (janusflow_ref).
- RuntimeEngine: our pipelines over the backend seam (`torch-fast`, `ort`, `trt`): static bucketed
  KV cache, prefix prefilled once (runtime/).
The VAE is loaded on the first generate, once: chat alone needs none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.janusflow_ref.processor import ChatInputs, Processor
from janusflow_trt.janusflow_ref.sampling import SamplingParams


class ReferenceEngine:
    def __init__(self, model, processor: Processor, vae_loader: Callable[[], Any]):
        self.model, self.processor, self._vae_loader = model, processor, vae_loader
        self._vae: Any = None

    def chat_tokens(self, inputs: ChatInputs, params: SamplingParams) -> Iterator[int]:
        from janusflow_trt.janusflow_ref.understanding import chat_tokens

        return chat_tokens(self.model, inputs, params, self.processor.eos_id)

    def prefix(self, prompt: str, num_images: int):
        from janusflow_trt.janusflow_ref.generation import prompt_prefix

        return prompt_prefix(self.model, self.processor, prompt, num_images)

    def euler(self, prefix, z0: np.ndarray, steps: int, cfg_weight: float) -> Iterator[np.ndarray]:
        from janusflow_trt.janusflow_ref.generation import euler_steps

        embeds, mask = prefix
        for z in euler_steps(self.model, embeds, mask, torch.from_numpy(z0), steps, cfg_weight):
            yield z.numpy()

    def ensure_vae(self) -> None:
        if self._vae is None:
            self._vae = self._vae_loader()

    def vae(self, z: np.ndarray) -> np.ndarray:
        from janusflow_trt.janusflow_ref.generation import vae_decode

        return vae_decode(self._vae, torch.from_numpy(z)).numpy()


class RuntimeEngine:
    def __init__(self, backend, cfg: JanusFlowConfig, processor: Processor,
                 add_vae: Callable[[], None] | None = None):
        """add_vae: gives the backend its vae_dec graph on first use (torch-fast loads the VAE weights;
        ort / trt have it among their artifacts)."""
        self.backend, self.cfg, self.processor, self._add_vae = backend, cfg, processor, add_vae

    def chat_tokens(self, inputs: ChatInputs, params: SamplingParams) -> Iterator[int]:
        from janusflow_trt.runtime.chat import chat_tokens

        return chat_tokens(self.backend, self.cfg, inputs, params, self.processor.eos_id)

    def prefix(self, prompt: str, num_images: int):
        from janusflow_trt.runtime.text2img import prefill_prefix

        return prefill_prefix(self.backend, self.cfg, self.processor, prompt, num_images)

    def euler(self, cache, z0: np.ndarray, steps: int, cfg_weight: float) -> Iterator[np.ndarray]:
        """The loop on the backend's device (runtime/euler_step.py); each step's z is read back here for
        the caller's callback and finiteness check (n x 36 KB; zero-copy on the CPU)."""
        from janusflow_trt.runtime.euler_step import euler_loop_tensors

        for z in euler_loop_tensors(self.backend, cache, z0, steps, cfg_weight):
            yield z.cpu().numpy()

    def ensure_vae(self) -> None:
        if self._add_vae is not None:
            self._add_vae()
            self._add_vae = None

    def vae(self, z: np.ndarray) -> np.ndarray:
        from janusflow_trt.runtime.text2img import vae_decode

        return vae_decode(self.backend, z)


class TrtRuntimeEngine(RuntimeEngine):
    """trt: the Euler loop on the device (runtime/trt_euler.py: shared engine buffers, one CUDA graph per
    step). Each step's z is read back for the caller's callback (n x 36 KB); the rest stays on the GPU."""

    def euler(self, cache, z0: np.ndarray, steps: int, cfg_weight: float) -> Iterator[np.ndarray]:
        from janusflow_trt.runtime.trt_euler import DeviceEulerLoop

        for z in DeviceEulerLoop(self.backend, cache, z0, steps, cfg_weight):
            yield z.cpu().numpy()


def build_engine(backend: str, model_dir: Path, cfg: JanusFlowConfig, processor: Processor,
                 artifacts: Path | None, vae_dir: Path | None, threads: int | None, precision: str = "fp32"):
    """Loads the weights (torch, torch-fast) or opens the artifacts (ort, trt): the one load of a Pipeline.
    The ort / trt path imports no model code (janusflow_ref.model, transformers' modeling, diffusers)."""
    from janusflow_trt.errors import InputError
    from janusflow_trt.runtime.backends import make_backend, physical_cores

    if backend in ("ort", "trt"):
        kind = TrtRuntimeEngine if backend == "trt" else RuntimeEngine
        return kind(make_backend(backend, model_dir, artifacts, cfg, threads, precision=precision), cfg, processor)
    if backend == "torch-cuda":  # weights and VAE on the GPU at load
        return RuntimeEngine(make_backend(backend, model_dir, None, cfg, need_vae=True, vae_dir=vae_dir), cfg,
                             processor)
    if backend not in ("torch", "torch-fast"):
        raise InputError(f"unknown backend {backend!r} (torch, torch-fast, ort, trt, torch-cuda)")
    from janusflow_trt.janusflow_ref import vae as vae_mod
    from janusflow_trt.janusflow_ref import weights
    from janusflow_trt.runtime.backends import TorchBackend

    def load_vae():
        return vae_mod.load_vae(vae_mod.resolve_vae_dir(model_dir, vae_dir))

    if backend == "torch":
        torch.set_num_threads(threads or physical_cores())
        return ReferenceEngine(weights.load_model(model_dir), processor, load_vae)
    b = TorchBackend(weights.load_model(model_dir), None, threads)
    return RuntimeEngine(b, cfg, processor, add_vae=lambda: b.add_vae(load_vae()))
