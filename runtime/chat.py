"""Understanding over the backend seam: SigLIP graph -> splice into token embeddings (here, on the
host) -> prefill -> decode loop with the static KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from janusflow_trt.janusflow_ref.processor import SYSTEM_PROMPT, ChatInputs, Processor
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.janusflow_ref.understanding import ChatResult, check_context

from .backends import Backend
from .decode import decode_tokens
from .kv_cache import StaticKVCache


def new_cache(cfg, batch: int, capacity: int, exact: bool = False, dtype=np.float32) -> StaticKVCache:
    """exact: capacity as given (a cache that will not grow, like the Euler loop's prompt prefix);
    dtype: the backend's KV dtype (its spec variant: FP16 for fp16 graphs)."""
    llm = cfg.llm
    hd = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
    return StaticKVCache(llm.num_hidden_layers, batch, llm.num_key_value_heads, hd, capacity, dtype=dtype,
                         exact=exact)


def kv_dtype(backend: Backend):
    """Backends with FP16 variants say so (OrtBackend.kv_dtype); the rest run an FP32 cache."""
    return getattr(backend, "kv_dtype", np.float32)


def llm_step(backend: Backend, cache: StaticKVCache, embeds: np.ndarray, new_mask: np.ndarray,
             write: bool = True, graph: str = "llm") -> dict[str, np.ndarray]:
    """Run the LLM graph on `embeds` [B,S,H] after the cached prefix; optionally append its K/V.
    graph: "llm", or its view "llm_gen" (last_hidden_state only) for a step that writes nothing."""
    assert not (write and graph != "llm"), "only the llm graph returns the K/V to write"
    b, s, _ = embeds.shape
    if write:
        cache.reserve(cache.length + s)
    pos = np.broadcast_to(np.arange(cache.length, cache.length + s, dtype=np.int64), (b, s))
    out = backend.run(graph, {"inputs_embeds": embeds, "attention_mask": cache.mask(new_mask),
                              "position_ids": np.ascontiguousarray(pos), **cache.past_feeds()})
    if write:
        cache.append(out, new_mask)
    return out


def prefill(backend: Backend, cache: StaticKVCache, embeds: np.ndarray) -> np.ndarray:
    out = llm_step(backend, cache, embeds, np.ones(embeds.shape[:2], np.int64))
    return out["logits"]


def decode_one_token(backend: Backend, cache: StaticKVCache, token: int) -> np.ndarray:
    emb = backend.run("embed", {"input_ids": np.array([[token]], np.int64)})["inputs_embeds"]
    return llm_step(backend, cache, emb, np.ones((1, 1), np.int64))["logits"]


def chat_tokens(backend: Backend, cfg, inputs: ChatInputs, params: SamplingParams, eos_id: int) -> Iterator[int]:
    """Answer token ids as they are sampled (the caller seeds torch's RNG); `inputs`: Processor.chat_inputs."""
    ids = inputs.input_ids.numpy()
    image_embeds = backend.run("siglip", {"pixel_values": inputs.pixel_values.numpy()})["image_embeds"]
    embeds = backend.run("embed", {"input_ids": ids})["inputs_embeds"].copy()
    embeds[0, inputs.image_positions.numpy()] = image_embeds[0]
    cache = new_cache(cfg, 1, ids.shape[1], dtype=kv_dtype(backend))  # grows in buckets with the answer
    logits = prefill(backend, cache, embeds)
    # the decode loop on the backend's device: one host read (the token id) per token
    yield from decode_tokens(backend, cache, logits, params, eos_id)


def chat(backend: Backend, cfg, processor: Processor, image: Image.Image, question: str,
         params: SamplingParams = SamplingParams(), seed: int = 42, system_prompt: str = SYSTEM_PROMPT,
         on_token: Callable[[int], None] | None = None) -> ChatResult:
    """The whole answer at once (janusflow_trt.Pipeline adds streaming text and timings)."""
    torch.manual_seed(seed)  # sampling draws from torch's global RNG, as the official demo
    inputs = processor.chat_inputs(image, question, system_prompt)
    check_context(inputs.input_ids.shape[1], params.max_new_tokens, cfg.max_context)
    generated: list[int] = []
    for tok in chat_tokens(backend, cfg, inputs, params, processor.eos_id):
        generated.append(tok)
        if on_token is not None:
            on_token(tok)
    return ChatResult(text=processor.decode(generated), token_ids=generated, prompt_tokens=inputs.input_ids.shape[1])
