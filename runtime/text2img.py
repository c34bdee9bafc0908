"""Text-to-image over the backend seam, with the prompt prefix prefilled ONCE: the prefix (every prompt
token before <begin_of_image>, cond and uncond rows) goes through the LLM once into an exact-size KV
cache; the Euler loop (runtime/euler_step.py) then attends to it at every step; the VAE decodes."""

from __future__ import annotations

import torch

from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.janusflow_ref.generation import cfg_rows, generation_mask, prompt_ids
from janusflow_trt.janusflow_ref.processor import Processor

from .backends import Backend
from .kv_cache import KVCache
from .llm import new_cache, prefill


def prefill_prefix(backend: Backend, cfg: JanusFlowConfig, processor: Processor, prompt: str, num_images: int
                   ) -> KVCache:
    ids = prompt_ids(processor, prompt, cfg)
    _, prefix_ids = cfg_rows(ids, num_images, processor.pad_id)
    dev = backend.device
    embeds = backend.run("embed", {"input_ids": prefix_ids.to(dev).contiguous()})["inputs_embeds"]
    p = embeds.shape[1]
    mask = generation_mask(num_images, p, cfg.num_gen_tokens)[:, :p].to(dev, torch.int64)
    # exactly the prefix: every step attends to these slots and nothing else is ever written
    cache = new_cache(backend, cfg, 2 * num_images, p, exact=True)
    prefill(backend, cache, embeds, mask)
    return cache


def vae_decode(backend: Backend, z: torch.Tensor) -> torch.Tensor:
    """z [n, 4, 48, 48] -> pixels [n, 3, 384, 384] in [-1, 1] (float32), on the backend's device."""
    return backend.run("vae_dec", {"latents": z.to(backend.device, torch.float32).contiguous()})["image"]
