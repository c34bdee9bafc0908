"""Test helpers over the runtime's own loops (no loop is written here): numpy in and out of the seam,
a whole chat, a whole Euler loop with every step's z kept."""

from __future__ import annotations

import numpy as np
import torch

from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.runtime import text2img
from janusflow_trt.runtime.chat import chat_tokens
from janusflow_trt.runtime.euler_step import euler_loop, euler_state, euler_step


def run_np(backend, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One graph call through the seam with numpy feeds (converted to the spec's dtypes); numpy copies out."""
    spec = backend.specs[graph]
    ins = {t.name: torch.from_numpy(np.ascontiguousarray(feeds[t.name], t.dtype)).to(backend.device)
           for t in spec.inputs}
    return {k: v.float().cpu().numpy().copy() if v.is_floating_point() else v.cpu().numpy().copy()
            for k, v in backend.run(graph, ins).items()}


def rt_chat(backend, cfg, processor, image, question: str, params: SamplingParams, seed: int = 42) -> list[int]:
    """The runtime's chat (runtime.chat.chat_tokens, what Pipeline.chat runs), seeded as the API seeds it."""
    torch.manual_seed(seed)
    return list(chat_tokens(backend, cfg, processor.chat_inputs(image, question), params, processor.eos_id))


def rt_euler(backend, cfg, processor, prompt: str, z0, steps: int, cfg_weight: float) -> list[np.ndarray]:
    """The runtime's prefix prefill and Euler loop (what Pipeline.generate runs): z after every step."""
    cache = text2img.prefill_prefix(backend, cfg, processor, prompt, z0.shape[0])
    return [z.cpu().numpy().copy() for z in euler_loop(backend, cache, torch.as_tensor(z0), steps, cfg_weight)]


def rt_vae(backend, z) -> np.ndarray:
    return text2img.vae_decode(backend, torch.as_tensor(z)).float().cpu().numpy().copy()


def rt_step0(backend, cfg, processor, prompt: str, z0, steps: int, cfg_weight: float):
    """The runtime's first Euler step (euler_step over its EulerState) -> numpy (step embeddings, t_emb,
    velocity) of that step."""
    cache = text2img.prefill_prefix(backend, cfg, processor, prompt, z0.shape[0])
    st = euler_state(backend, cache, torch.as_tensor(z0), steps, cfg_weight)
    enc, dec = euler_step(backend, st)
    return (enc["step_embeds"].float().cpu().numpy().copy(), enc["t_emb"].float().cpu().numpy().copy(),
            dec["velocity"].float().cpu().numpy().copy())
