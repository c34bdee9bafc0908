"""The Euler loop on TensorRT with nothing crossing to the host inside it: the wiring of
runtime/euler_step.py turned into shared device buffers, and the step captured once as a CUDA graph.

Per request (not per step): the prompt prefix's K/V go to the device once, the constants and the table
of all timesteps are uploaded once. Per step: t <- t_table[i] (a device-to-device copy on the stream),
then one graph replay (gen_enc -> llm over the cached prefix -> gen_dec, then z <- z_next).
GPU only.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .cuda_graph import CapturedStep
from .euler_step import CARRY, EULER_STEP, check_wiring, resolve_step, step_constants
from .trt_backend import TrtBackend


def _dev(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to("cuda")


class DeviceEulerLoop:
    def __init__(self, backend: TrtBackend, cache, z: np.ndarray, steps: int, cfg_weight: float):
        check_wiring(backend.specs)
        self.b, self.steps, self.n = backend, steps, z.shape[0]
        rows = 2 * self.n
        step_tokens = backend.specs["gen_enc"].outputs[0].shape[1]
        assert isinstance(step_tokens, int)
        c = step_constants(cache, rows, step_tokens, cfg_weight, steps)
        self.t_table = _dev(c.pop("t_table"))
        consts = {k: _dev(v) for k, v in c.items()}
        kv = {k: _dev(v) for k, v in cache.past_feeds().items()}
        self.carry = {"z": _dev(np.concatenate([z, z]).astype(np.float32))}
        self.t = torch.empty_like(self.t_table[0])
        sizes = {"B": rows, "S": step_tokens, "C": cache.capacity}
        bufs: dict[str, dict[str, torch.Tensor]] = {}
        for graph, pairs in resolve_step(backend.specs):
            spec = backend.specs[graph]
            ext: dict[str, torch.Tensor] = {}
            for name, src in pairs:
                ext[name] = (bufs[src[1]][src[2]] if src[0] == "out" else kv[name] if src[0] == "cache"
                             else self.t if src[0] == "step" else self.carry[src[1]] if src[0] == "carry"
                             else consts[src[1]])
            shapes = {t.name: spec.shape(t, **{k: v for k, v in sizes.items() if k in spec.syms}) for t in spec.inputs}
            bufs[graph] = backend.buffers(graph, shapes, ext)
        self.z_next = {k: bufs[g][o] for k, (g, o) in CARRY.items()}
        self.step = CapturedStep(self._enqueue_step, backend.stream)

    def _enqueue_step(self, stream: torch.cuda.Stream) -> None:
        for graph, _ in EULER_STEP:
            self.b.engines[graph].enqueue(stream)
        with torch.cuda.stream(stream):
            for k, buf in self.carry.items():
                buf.copy_(self.z_next[k])

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yields the device z [n,4,48,48] after each step (a view of the carry: copy what you keep)."""
        for i in range(self.steps):
            with torch.cuda.stream(self.b.stream):
                self.t.copy_(self.t_table[i])
            self.step()
            yield self.carry["z"][: self.n]
