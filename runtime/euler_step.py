"""One Euler step as a fixed sequence of graph calls over fixed buffers: the wiring below says where every
input of every graph comes from, once. On a GPU (DeviceEulerLoop) the wiring becomes shared device
tensors (an output buffer of one engine IS the input buffer of the next) and the whole step, the carry
z <- z_next included, is captured as one CUDA graph; per step only t is written, from a device table
of all timesteps computed once per request. On the CPU, run_step_host() executes the same wiring over
the numpy seam, which is how CI checks the wiring against the pipeline in text2img.py.

Sources: ("carry", "z") the loop state; ("step", "t") the per-step timestep; ("const", k) per-request
constants; ("out", graph, output) an earlier graph's output; ("cache", "*") the prompt prefix's K/V.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from janusflow_trt.export.specs import GraphSpec
from janusflow_trt.janusflow_ref.generation import timestep

Source = tuple[str, ...]
KV_PREFIX = "past_key_values."

EULER_STEP: tuple[tuple[str, dict[str, Source]], ...] = (
    ("gen_enc", {"z": ("carry", "z"), "t": ("step", "t")}),
    ("llm_gen", {"inputs_embeds": ("out", "gen_enc", "step_embeds"), "attention_mask": ("const", "mask"),
                 "position_ids": ("const", "positions"), KV_PREFIX + "*": ("cache", "*")}),
    ("gen_dec", {"hidden": ("out", "llm_gen", "last_hidden_state"), "skip": ("out", "gen_enc", "skip"),
                 "t_emb": ("out", "gen_enc", "t_emb"), "z": ("carry", "z"), "cfg_weight": ("const", "cfg_weight"),
                 "dt": ("const", "dt")}),
)
CARRY = {"z": ("gen_dec", "z_next")}


def source_of(feeds: dict[str, Source], name: str) -> Source | None:
    if name in feeds:
        return feeds[name]
    if name.startswith(KV_PREFIX) and KV_PREFIX + "*" in feeds:
        return feeds[KV_PREFIX + "*"]
    return None


def check_wiring(specs: dict[str, GraphSpec], step=EULER_STEP, carry=CARRY) -> None:
    """Every input of every graph has a source; every ("out", g, o) names an output of a graph that runs
    earlier in the step; the carry is produced by the step. AssertionError naming the first violation."""
    done: dict[str, set[str]] = {}
    for graph, feeds in step:
        spec = specs[graph]
        for name in spec.input_names:
            src = source_of(feeds, name)
            assert src is not None, f"{graph}.{name} has no source"
            if src[0] == "out":
                assert src[1] in done and src[2] in done[src[1]], f"{graph}.{name} reads {src[1]}.{src[2]} " \
                                                                  f"before it is produced"
        extra = [k for k in feeds if k not in spec.input_names and not k.endswith("*")]
        assert not extra, f"{graph}: wiring feeds unknown inputs {extra}"
        done[graph] = set(spec.output_names)
    for name, (g, o) in carry.items():
        assert o in done.get(g, set()), f"carry {name} <- {g}.{o} is not produced by the step"


def step_constants(cache, rows: int, step_tokens: int, cfg_weight: float, steps: int) -> dict[str, np.ndarray]:
    """Per-request constants (computed once, not per step) and the timestep table [steps, rows]."""
    c = cache.capacity
    return {"mask": cache.mask(np.ones((rows, step_tokens), np.int64)).copy(),
            "positions": np.broadcast_to(np.arange(c, c + step_tokens, dtype=np.int64), (rows, step_tokens)).copy(),
            "cfg_weight": np.array([cfg_weight], np.float32), "dt": np.array([1.0 / steps], np.float32),
            "t_table": np.stack([np.full((rows,), timestep(i, steps), np.float32) for i in range(steps)])}


def resolve_step(specs: dict[str, GraphSpec], step=EULER_STEP) -> list[tuple[str, list[tuple[str, Source]]]]:
    """The wiring per graph input, looked up once per request: [(graph, [(input, source)])]."""
    out = []
    for graph, feeds in step:
        pairs = []
        for name in specs[graph].input_names:
            src = source_of(feeds, name)
            assert src is not None
            pairs.append((name, src))
        out.append((graph, pairs))
    return out


def run_wired(run, wired, sources: dict[str, dict], kv: dict) -> dict[str, dict]:
    """One step: each graph of `wired` called through `run` (backend.run or run_tensors) on its sources."""
    outs: dict[str, dict] = {}
    for graph, pairs in wired:
        outs[graph] = run(graph, {name: outs[src[1]][src[2]] if src[0] == "out" else kv[name]
                                  if src[0] == "cache" else sources[src[0]][src[1]] for name, src in pairs})
    return outs


def run_step_host(backend, state: dict[str, Any], consts: dict[str, np.ndarray], kv: dict[str, np.ndarray],
                  t: np.ndarray) -> None:
    """One step over backend.run (numpy seam), following EULER_STEP; updates state["z"] in place of the carry."""
    outs = run_wired(backend.run, resolve_step(backend.specs),
                     {"carry": state, "step": {"t": t}, "const": consts}, kv)
    for name, (g, o) in CARRY.items():
        state[name] = outs[g][o].copy()


def euler_loop_tensors(backend, cache, z: np.ndarray, steps: int, cfg_weight: float):
    """The Euler loop over the device-resident seam (backend.run_tensors, on backend.device), following
    EULER_STEP: the K/V, constants and timestep table go to the device once per request; per step
    nothing crosses to the host. Yields the device z [n,4,48,48] after each step (a view of the carry,
    rewritten by the next step: copy what you keep)."""
    import torch

    dev = backend.device
    n = z.shape[0]
    step_tokens = backend.specs["gen_enc"].outputs[0].shape[1]
    c = step_constants(cache, 2 * n, step_tokens, cfg_weight, steps)
    table = torch.as_tensor(c.pop("t_table"), device=dev)  # [steps, 2n]
    consts = {k: torch.as_tensor(v, device=dev) for k, v in c.items()}
    kv = {k: torch.as_tensor(v, device=dev) for k, v in cache.past_feeds().items()}
    state = {"z": torch.as_tensor(np.concatenate([z, z]).astype(np.float32), device=dev)}
    wired = resolve_step(backend.specs)
    for i in range(steps):
        outs = run_wired(backend.run_tensors, wired, {"carry": state, "step": {"t": table[i]}, "const": consts}, kv)
        for name, (g, o) in CARRY.items():
            state[name].copy_(outs[g][o])
        yield state["z"][:n]
