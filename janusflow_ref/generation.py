"""Eager text-to-image, exactly the official loop (demo/app_janusflow.py: generate):

rows = [cond x n, uncond x n]; uncond rows are pad ids after the first token and masked out;
the final <begin_of_image> embedding is dropped and t_emb takes its place; at every step the
whole prompt is recomputed (the official KV reuse is dead code), t = step/steps*1000,
v = w*v_cond - (w-1)*v_uncond, z = z + dt*v; then VAE decode of z / scaling_factor.
This is also the "official-style" baseline of the benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from janusflow_trt.errors import InputError

from .processor import Processor

if TYPE_CHECKING:  # the runtime imports the helpers here without transformers' model code
    from .model import JanusFlow

LATENT_SHAPE = (4, 48, 48)


def check_generation_args(steps: int, cfg_weight: float, num_images: int, max_images: int = 64) -> None:
    """max_images: the batch limit of the exported graphs (export.specs.max_images)."""
    if not 1 <= steps <= 1000:
        raise InputError(f"--steps must be in [1, 1000], got {steps}")
    if not (cfg_weight == cfg_weight) or not -100.0 <= cfg_weight <= 100.0:
        raise InputError(f"--cfg must be a finite number in [-100, 100], got {cfg_weight}")
    if not 1 <= num_images <= max_images:
        raise InputError(f"--num-images must be in [1, {max_images}] (the graphs' batch limit), got {num_images}")


def initial_latents(num_images: int, seed: int, init: np.ndarray | None = None) -> torch.Tensor:
    """torch.manual_seed(seed); randn([n,4,48,48]) as the official demo, unless latents are given."""
    if init is not None:
        if init.shape != (num_images, *LATENT_SHAPE):
            raise InputError(f"--init-latents has shape {init.shape}, expected {(num_images, *LATENT_SHAPE)}")
        if not np.isfinite(init).all():
            raise InputError("--init-latents contains NaN or Inf")
        return torch.from_numpy(np.ascontiguousarray(init, dtype=np.float32))
    torch.manual_seed(seed)
    return torch.randn((num_images, *LATENT_SHAPE), dtype=torch.float32)


def cfg_rows(ids: list[int], num_images: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens [2n, L] (uncond rows: pad after the first token), mask [2n, L-1+G] filled later."""
    tokens = torch.tensor([ids] * (2 * num_images), dtype=torch.long)
    tokens[num_images:, 1:] = pad_id
    return tokens, tokens[:, :-1]


def generation_mask(num_images: int, prefix_len: int, gen_tokens: int) -> torch.Tensor:
    """[2n, prefix+1+G] int: uncond rows see only the first token of the prompt."""
    mask = torch.ones((2 * num_images, prefix_len + 1 + gen_tokens), dtype=torch.int)
    mask[num_images:, 1:prefix_len] = 0
    return mask


def timestep(step: int, steps: int) -> float:
    return step / steps * 1000.0


@torch.inference_mode()
def euler_steps(model: JanusFlow, prefix_embeds: torch.Tensor, mask: torch.Tensor, z: torch.Tensor,
                steps: int, cfg_weight: float) -> Iterator[torch.Tensor]:
    """The official loop with per-step prompt recompute; yields z after each step."""
    dt = torch.zeros_like(z) + 1.0 / steps
    for step in range(steps):
        z_in = torch.cat([z, z], dim=0)
        t = torch.tensor([timestep(step, steps)] * z_in.shape[0]).to(dt)
        z_emb, t_emb, skip = model.gen_encode(z_in, t)
        llm_in = torch.cat([prefix_embeds, t_emb.unsqueeze(1), z_emb], dim=1)
        hidden = model.language_model.model(inputs_embeds=llm_in, attention_mask=mask).last_hidden_state
        v = model.gen_decode(hidden[:, -z_emb.shape[1]:, :], skip, t_emb)
        v_cond, v_uncond = torch.chunk(v, 2)
        v = cfg_weight * v_cond - (cfg_weight - 1.0) * v_uncond
        z = z + dt * v
        yield z


def prompt_ids(processor: Processor, prompt: str, cfg) -> list[int]:
    """Generation prompt ids (ending in <begin_of_image>), refused if the image tokens would not fit."""
    ids = processor.generation_ids(prompt)
    if len(ids) + cfg.num_gen_tokens > cfg.max_context:
        raise InputError(
            f"prompt is {len(ids)} tokens; with {cfg.num_gen_tokens} image tokens it exceeds the "
            f"model's context ({cfg.max_context})"
        )
    return ids


@torch.inference_mode()
def prompt_prefix(model: JanusFlow, processor: Processor, prompt: str, num_images: int):
    """-> (prefix embeddings [2n, L-1, H] with the final <begin_of_image> dropped, mask [2n, L-1+1+G])."""
    ids = prompt_ids(processor, prompt, model.cfg)
    tokens, _ = cfg_rows(ids, num_images, processor.pad_id)
    embeds = model.embed_tokens(tokens)[:, :-1, :]
    return embeds, generation_mask(num_images, embeds.shape[1], model.cfg.num_gen_tokens)


@torch.inference_mode()
def vae_decode(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z / vae.config.scaling_factor).sample
