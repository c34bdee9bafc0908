"""The LLM graph over the KV cache: the one call that prefills (chat, the generation prompt's prefix)
and that the Euler step makes over the cached prefix (its `llm_gen` view, writing nothing)."""

from __future__ import annotations

import torch

from janusflow_trt.janusflow_ref.config import JanusFlowConfig

from .backends import Backend
from .kv_cache import KVCache


def new_cache(backend: Backend, cfg: JanusFlowConfig, batch: int, capacity: int, exact: bool = False) -> KVCache:
    """A cache on the backend's device in its K/V dtype (FP16 for fp16 graphs, BF16 on torch-cuda)."""
    return KVCache(cfg, batch, capacity, backend.device, backend.kv_dtype, exact=exact)


def positions(start: int, rows: int, s: int, device: torch.device) -> torch.Tensor:
    """[rows, s] int64: start, start + 1, ... on every row."""
    return torch.arange(start, start + s, dtype=torch.int64, device=device).expand(rows, s).contiguous()


def prefill(backend: Backend, cache: KVCache, embeds: torch.Tensor, new_mask: torch.Tensor | None = None
            ) -> dict[str, torch.Tensor]:
    """embeds [B, S, H] after what the cache holds, their K/V appended; -> the llm graph's outputs
    (logits [B, V] of the last position). new_mask [B, S]: the new tokens' own mask (default all 1)."""
    b, s, _ = embeds.shape
    if new_mask is None:
        new_mask = torch.ones((b, s), dtype=torch.int64, device=backend.device)
    cache.reserve(cache.length + s)
    out = backend.run("llm", {"inputs_embeds": embeds, "attention_mask": cache.mask(new_mask),
                              "position_ids": positions(cache.length, b, s, backend.device), **cache.feeds()})
    cache.append(out, new_mask)
    return out
