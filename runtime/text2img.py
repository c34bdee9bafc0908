"""Text-to-image over the backend seam, with the prompt prefix prefilled ONCE.

Rows are [cond x n, uncond x n] as in the official loop. The prefix (every prompt token before
<begin_of_image>) is run through the LLM once into the static cache; each Euler step then runs
only the 1 + G image-side tokens (t_emb, G latent tokens) against it, so every step has the same
shapes. CFG and the Euler update happen inside the gen_dec graph (z_next).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from janusflow_trt.janusflow_ref.generation import cfg_rows, generation_mask, prompt_ids, timestep
from janusflow_trt.janusflow_ref.processor import Processor

from .backends import Backend
from .chat import kv_dtype, llm_step, new_cache


def prefill_prefix(backend: Backend, cfg, processor: Processor, prompt: str, num_images: int):
    ids = prompt_ids(processor, prompt, cfg)
    tokens, prefix_ids = cfg_rows(ids, num_images, processor.pad_id)
    prefix = backend.run("embed", {"input_ids": prefix_ids.numpy()})["inputs_embeds"]
    mask = generation_mask(num_images, prefix.shape[1], cfg.num_gen_tokens).numpy().astype(np.int64)
    # exactly the prefix: every step attends to these slots and nothing else is ever written
    cache = new_cache(cfg, 2 * num_images, prefix.shape[1], exact=True, dtype=kv_dtype(backend))
    llm_step(backend, cache, prefix, mask[:, :prefix.shape[1]])
    return cache


def euler_loop(backend: Backend, cache, z: np.ndarray, steps: int, cfg_weight: float) -> Iterator[np.ndarray]:
    """z [n,4,48,48] -> yields z after each step (first half of the duplicated z_next)."""
    n = z.shape[0]
    z2 = np.concatenate([z, z], axis=0).astype(np.float32)
    w = np.array([cfg_weight], np.float32)
    dt = np.array([1.0 / steps], np.float32)
    ts = [np.full((2 * n,), timestep(step, steps), np.float32) for step in range(steps)]  # once per request
    for t in ts:
        enc = backend.run("gen_enc", {"z": z2, "t": t})
        embeds = enc["step_embeds"]  # [2n, 1+G, H]: t_emb then the latent tokens, straight from the graph
        # the llm_gen view: last_hidden_state only (no LM head, no K/V out)
        out = llm_step(backend, cache, embeds, np.ones(embeds.shape[:2], np.int64), write=False, graph="llm_gen")
        dec = backend.run("gen_dec", {"hidden": out["last_hidden_state"], "skip": enc["skip"], "t_emb": enc["t_emb"],
                                      "z": z2, "cfg_weight": w, "dt": dt})
        z2 = dec["z_next"]
        yield z2[:n].copy()  # z2 is a backend buffer reused two steps later


def vae_decode(backend: Backend, z: np.ndarray) -> np.ndarray:
    return backend.run("vae_dec", {"latents": np.ascontiguousarray(z, np.float32)})["image"]
