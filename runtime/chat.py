"""Understanding over the backend seam: SigLIP graph -> token embeddings with the image embeddings
spliced in (on the device) -> prefill into one KV cache -> the decode loop (runtime/decode.py)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.janusflow_ref.processor import ChatInputs
from janusflow_trt.janusflow_ref.sampling import SamplingParams

from .backends import Backend
from .decode import decode_tokens
from .kv_cache import KVCache
from .llm import new_cache, prefill

# the graphs a chat runs and text-to-image does not: a job that runs chats, then images, releases them
# between the two (backends.release: at full size SigLIP's FP32 session and the chat's buffers are ~2 GB)
CHAT_ONLY = ["siglip"]


def prompt_embeds(backend: Backend, inputs: ChatInputs) -> torch.Tensor:
    """The chat prefill input [1, T, H]: token embeddings with the image embeddings spliced in."""
    dev = backend.device
    image = backend.run("siglip", {"pixel_values": inputs.pixel_values.to(dev).contiguous()})["image_embeds"]
    embeds = backend.run("embed", {"input_ids": inputs.input_ids.to(dev).contiguous()})["inputs_embeds"].clone()
    embeds[0, inputs.image_positions.to(dev)] = image[0].to(embeds.dtype)
    return embeds


def chat_prefill(backend: Backend, cfg: JanusFlowConfig, inputs: ChatInputs, capacity: int = 0
                 ) -> tuple[KVCache, torch.Tensor]:
    """-> the prefilled cache and the last position's logits [1, V]. capacity: slots to reserve
    beyond the prompt (0: the cache grows in buckets with the answer)."""
    embeds = prompt_embeds(backend, inputs)
    cache = new_cache(backend, cfg, 1, embeds.shape[1] + capacity)
    return cache, prefill(backend, cache, embeds)["logits"]


def chat_tokens(backend: Backend, cfg: JanusFlowConfig, inputs: ChatInputs, params: SamplingParams,
                eos_id: int) -> Iterator[int]:
    """Answer token ids as they are sampled (the caller seeds torch's RNG); `inputs`: Processor.chat_inputs."""
    cache, logits = chat_prefill(backend, cfg, inputs)
    yield from decode_tokens(backend, cache, logits, params, eos_id)
