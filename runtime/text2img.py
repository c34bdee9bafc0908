"""Text-to-image over the backend seam, with the prompt prefix prefilled ONCE: the prefix (every prompt
token before <begin_of_image>, cond and uncond rows) goes through the LLM once into an exact-size KV
cache; the Euler loop (runtime/euler_step.py) then attends to it at every step; the VAE decodes.

Batched across requests (janusflow_trt/image_batch.py), each request's rows are prefilled on their own
(`prefix_row`: its cond row; the uncond row, BOS then pads with only BOS attended, depends on the
prefix's length alone and is shared) and the rows of every request in a step are joined into one cache
(`join_rows`): rows with shorter prefixes carry masked slots up to the longest."""

from __future__ import annotations

import torch

from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.janusflow_ref.generation import cfg_rows, generation_mask, prompt_ids
from janusflow_trt.janusflow_ref.processor import Processor

from .backends import Backend
from .kv_cache import KVCache
from .llm import new_cache, prefill


def _prefill_rows(backend: Backend, cfg: JanusFlowConfig, ids: torch.Tensor, mask: torch.Tensor) -> KVCache:
    """ids, mask [rows, P] -> an exact-size cache holding their K/V (every step attends to these slots and
    nothing else is ever written)."""
    dev = backend.device
    embeds = backend.run("embed", {"input_ids": ids.to(dev).contiguous()})["inputs_embeds"]
    cache = new_cache(backend, cfg, ids.shape[0], ids.shape[1], exact=True)
    prefill(backend, cache, embeds, mask.to(dev, torch.int64))
    return cache


def prefill_prefix(backend: Backend, cfg: JanusFlowConfig, processor: Processor, prompt: str, num_images: int
                   ) -> KVCache:
    ids = prompt_ids(processor, prompt, cfg)
    _, prefix_ids = cfg_rows(ids, num_images, processor.pad_id)
    p = prefix_ids.shape[1]
    return _prefill_rows(backend, cfg, prefix_ids, generation_mask(num_images, p, cfg.num_gen_tokens)[:, :p])


def prefix_row(backend: Backend, cfg: JanusFlowConfig, ids: list[int], pad_id: int, uncond: bool) -> KVCache:
    """One row of prefill_prefix's cache for the generation prompt `ids`: its cond row, or its uncond
    row (which depends only on the first id, BOS, and the length: share it across prompts)."""
    _, prefix_ids = cfg_rows(ids, 1, pad_id)
    p = prefix_ids.shape[1]
    r = slice(1, 2) if uncond else slice(0, 1)
    return _prefill_rows(backend, cfg, prefix_ids[r], generation_mask(1, p, cfg.num_gen_tokens)[r, :p])


def join_rows(backend: Backend, cfg: JanusFlowConfig, rows: list[KVCache]) -> KVCache:
    """One-row prefix caches -> one exact cache with those rows in order, its capacity the longest
    prefix; a shorter row's slots beyond its own length are masked (KVCache.fill_row)."""
    cache = new_cache(backend, cfg, len(rows), max(r.length for r in rows), exact=True)
    for i, r in enumerate(rows):
        cache.fill_row(i, r)
    return cache


def vae_decode(backend: Backend, z: torch.Tensor) -> torch.Tensor:
    """z [n, 4, 48, 48] -> pixels [n, 3, 384, 384] in [-1, 1] (float32), on the backend's device."""
    return backend.run("vae_dec", {"latents": z.to(backend.device, torch.float32).contiguous()})["image"]
