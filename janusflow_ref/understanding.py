"""Eager understanding pipeline, as the official demo runs it (multimodal_understanding):
image + question -> prompt ids -> embeddings with the image spliced in -> AR decoding with the
HF KV cache -> detokenised answer. The reference every other backend is checked against."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import DynamicCache

from janusflow_trt.errors import InputError

from .processor import SYSTEM_PROMPT, Processor
from .sampling import SamplingParams, next_token

if TYPE_CHECKING:  # the runtime imports ChatResult / check_context from here without transformers' model code
    from .model import JanusFlow


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


def splice_image(embeds: torch.Tensor, image_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """embeds [1,T,H]; image_embeds [1,N+1,H] go to `positions` (begin-of-image + N placeholders)."""
    embeds = embeds.clone()
    embeds[0, positions] = image_embeds[0].to(embeds.dtype)
    return embeds


def check_context(prompt_len: int, max_new_tokens: int, max_context: int) -> None:
    if prompt_len >= max_context:
        raise InputError(f"prompt is {prompt_len} tokens; the model's context is {max_context}")
    if prompt_len + max_new_tokens > max_context:
        raise InputError(
            f"prompt ({prompt_len} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's context "
            f"({max_context})"
        )


@torch.inference_mode()
def chat_tokens(model: JanusFlow, inputs, params: SamplingParams, eos_id: int) -> Iterator[int]:
    """Answer token ids as they are sampled (the caller seeds torch's RNG); `inputs`: Processor.chat_inputs."""
    dtype = next(model.parameters()).dtype
    image_embeds = model.encode_image(inputs.pixel_values.to(dtype))
    embeds = splice_image(model.embed_tokens(inputs.input_ids), image_embeds, inputs.image_positions)
    cache = DynamicCache(config=model.cfg.llm)
    out = model.language_model(inputs_embeds=embeds, cache=cache, use_cache=True)
    for i in range(params.max_new_tokens):
        tok = int(next_token(out.logits[:, -1, :], params, i)[0])
        yield tok
        if tok == eos_id:
            return
        out = model.language_model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)


def chat(model: JanusFlow, processor: Processor, image: Image.Image, question: str,
         params: SamplingParams = SamplingParams(), seed: int = 42, system_prompt: str = SYSTEM_PROMPT,
         on_token: Callable[[int], None] | None = None) -> ChatResult:
    torch.manual_seed(seed)
    inputs = processor.chat_inputs(image, question, system_prompt)
    ids = inputs.input_ids
    check_context(ids.shape[1], params.max_new_tokens, model.cfg.max_context)
    generated: list[int] = []
    for tok in chat_tokens(model, inputs, params, processor.eos_id):
        generated.append(tok)
        if on_token is not None:
            on_token(tok)
    return ChatResult(text=processor.decode(generated), token_ids=generated, prompt_tokens=ids.shape[1])
