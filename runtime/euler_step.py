"""The Euler step and loop of text-to-image, on the backend's device.

Rows are [cond x n, uncond x n] as in the official loop. The prompt prefix is in the KV cache
(runtime/text2img.py: prefix); a step runs only the 1 + G image-side tokens against it:
    gen_enc(z, t) -> llm_gen(step embeds | cached prefix) -> gen_dec(hidden, skip, t_emb, z, w, dt) -> z
and the CFG combination and the Euler update z + dt * v happen inside gen_dec (its z_next output).
Everything a step reads lives in fixed buffers made once per request (EulerState): per step only the
timestep row t is written, from a table of all timesteps, so a capturable backend captures the step as
one CUDA graph and replays it.

Rows of different requests share the step (janusflow_trt/image_batch.py): t is per row, so rows sit at
different steps (`row_timesteps`), and each row's step tokens take the positions after its own prefix
(the cache's per-row lengths: rows with shorter prompts carry masked slots). dt and the CFG weight are
one value per call (gen_dec's inputs [1]): rows sharing a step share them.
Nothing crosses to the host inside the loop; the caller decides what to read (runtime.text2img, api).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from janusflow_trt.janusflow_ref.generation import timestep

from .backends import Backend
from .cuda_graph import StepRunner
from .kv_cache import KVCache
from .llm import positions


@dataclass
class EulerState:
    """One request's fixed buffers on the backend's device (rows = 2 x images)."""

    z: torch.Tensor  # [rows, 4, 48, 48] float32: the carry, rewritten in place by every step
    t: torch.Tensor  # [rows] float32: this step's timestep, written before each step
    t_table: torch.Tensor  # [steps, rows]: every step's timesteps, computed once
    mask: torch.Tensor  # [rows, C + 1 + G]: the prefix's mask, then the step tokens'
    positions: torch.Tensor  # [rows, 1 + G]: P_r, P_r + 1, ... (P_r: row r's prefix length)
    kv: dict[str, torch.Tensor]  # the prefix's K/V (read only)
    cfg_weight: torch.Tensor  # [1]
    dt: torch.Tensor  # [1]


def euler_state(backend: Backend, cache: KVCache, z0: torch.Tensor, steps: int, cfg_weight: float) -> EulerState:
    """z0 [n, 4, 48, 48] -> the state before the first step (the carry holds z0 twice: cond, uncond rows).
    cache: the prefixes of the 2n rows [cond x n, uncond x n] (each row its own length)."""
    dev, rows = backend.device, 2 * z0.shape[0]
    assert cache.batch == rows, f"{rows} rows of z, {cache.batch} of prefix"
    s = int(backend.specs["gen_enc"].outputs[0].shape[1])  # 1 + G step tokens
    table = torch.tensor([[timestep(i, steps)] * rows for i in range(steps)], dtype=torch.float32, device=dev)
    starts = torch.tensor(cache.lengths, dtype=torch.int64, device=dev).view(rows, 1)
    return EulerState(z=torch.cat([z0, z0]).to(dev, torch.float32).contiguous(), t=table[0].clone(), t_table=table,
                      mask=cache.mask(torch.ones((rows, s), dtype=torch.int64, device=dev)),
                      positions=starts + positions(0, rows, s, dev), kv=cache.feeds(),
                      cfg_weight=torch.tensor([cfg_weight], dtype=torch.float32, device=dev),
                      dt=torch.tensor([1.0 / steps], dtype=torch.float32, device=dev))


def row_timesteps(done: list[int], steps: int, device: torch.device) -> torch.Tensor:
    """[2n] float32: each image's next timestep (done[j]: its steps done), on its cond and uncond rows."""
    t = [timestep(i, steps) for i in done]
    return torch.tensor(t + t, dtype=torch.float32, device=device)


def euler_step(backend: Backend, st: EulerState) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One step, z <- z_next, all on the device. -> the gen_enc and gen_dec outputs (backend buffers,
    for a caller that inspects the step: t_emb, step embeddings, velocity)."""
    enc = backend.run("gen_enc", {"z": st.z, "t": st.t})
    hidden = backend.run("llm_gen", {"inputs_embeds": enc["step_embeds"], "attention_mask": st.mask,
                                     "position_ids": st.positions, **st.kv})["last_hidden_state"]
    dec = backend.run("gen_dec", {"hidden": hidden, "skip": enc["skip"], "t_emb": enc["t_emb"], "z": st.z,
                                  "cfg_weight": st.cfg_weight, "dt": st.dt})
    st.z.copy_(dec["z_next"])
    return enc, dec


def euler_loop(backend: Backend, cache: KVCache, z0: torch.Tensor, steps: int, cfg_weight: float
               ) -> Iterator[torch.Tensor]:
    """Yields the device z [n, 4, 48, 48] after each step: a view of the carry, rewritten by the next
    step (copy what you keep)."""
    st = euler_state(backend, cache, z0, steps, cfg_weight)
    run = StepRunner(backend, lambda: euler_step(backend, st))
    n = z0.shape[0]
    for i in range(steps):
        run.write(st.t, st.t_table[i])
        run()
        yield st.z[:n]
