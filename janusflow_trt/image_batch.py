"""Continuous batching of text-to-image: the Euler steps of several requests share one step call
(runtime/euler_step.py's euler_step over their rows). Between two steps the scheduler admits waiting
requests (each prefix prefilled on its own, runtime/text2img.py) and retires finished or cancelled
ones; a request joins at the next step boundary instead of waiting for the running ones to finish.
The step knows nothing of requests.

- Rows: a step call holds [cond x m, uncond x m] for the m images of its requests, each image at its
  own step (t per row), each row attending to its own prefix (rows with shorter prompts carry masked
  slots up to the longest). The uncond row's prefix (BOS, then pads that are masked) depends only on
  its length: prefilled once per length and shared (a small LRU).
- Compatibility: gen_dec takes one dt (1/steps) and one CFG weight per call, so only requests with the
  same `steps` and `cfg_weight` share a call (`ImageRequest.key`).
- Groups: the requests of one step call, one key, at most `step_images` images (a request's own n
  images always share a call); the groups take turns, one step call each. A newcomer's first step is a
  call of its own (shared only with other newcomers) and goes first: its time to first step is the
  running call, then one call of its own size, not one of the batch's size; after it, the newcomer's
  group merges into a running group of its key with room (one state rebuild).
  `step_images` < `capacity` time-slices instead of batching: where a bigger call costs more per image
  (ORT on a small CPU: docs/serving.md), requests still interleave at step granularity.
- Images in flight (all groups) are at most `capacity` (the graphs' batch limit:
  export.specs.max_images); a request that does not fit waits, first come first served.
- A request's latents do not depend on its companions beyond the summation order of the larger GEMMs
  (FP32: within the tolerance tests/test_image_batch.py states): its noise is seeded as the CLI's
  (initial_latents), its rows see only its own prefix, its t and its z.
- VAE decodes never hold up a step: a finished request leaves its group at once and its VAE decode
  (about 3 solo Euler steps on the small preset) runs on a decode thread of its own (`decode_thread`),
  while the step calls go on; its result is handed back by the next `step()`. The thread runs at a
  lower CPU priority (VAE_NICE) so that on a small CPU a decode fills the gaps between steps rather than
  slowing them. Without a decode thread (capturable backends: every graph runs on the backend's one
  stream, and a decode enqueued while a step is being captured would be recorded into it; TensorRT's
  engines share one scratch block) a decode is a round of its own, one request per round, run only when
  no admitted request is waiting for its first step.
When membership changes the group's step state is rebuilt (the prefixes joined into one cache, the
carried z gathered): one copy per join or leave, amortised over the steps.
The scheduler runs on one thread (the server's engine thread); it is not thread-safe.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from janusflow_trt.errors import InputError
from janusflow_trt.janusflow_ref.generation import initial_latents
from janusflow_trt.runtime.cuda_graph import StepRunner
from janusflow_trt.runtime.euler_step import EulerState, euler_state, euler_step, row_timesteps
from janusflow_trt.runtime.kv_cache import KVCache
from janusflow_trt.runtime.text2img import join_rows, prefix_row, vae_decode

from .api import GenerateResult, final_images
from .engines import RuntimeEngine

UNCOND_CACHE = 32  # uncond prefixes kept (one per prompt length)
VAE_NICE = 10  # the decode thread's nice value (the engine thread's is 0): docs/serving.md, images under load
DECODE_POLL_S = 0.01  # with only decodes in flight, how long step() waits for one before returning


def _lower_priority() -> None:
    """The calling thread at nice VAE_NICE. Linux only (there nice is per thread, and the threads ONNX
    Runtime starts from this one for the VAE's session inherit it); elsewhere nothing."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), VAE_NICE)


def predicted_x0(z_before: torch.Tensor, z_after: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """The clean latent the flow predicts at Euler step `step`: x0 = z + (1 - t) v with t = step/steps
    and v = (z_after - z_before) * steps (the step's own update, CFG included), so
    x0 = z_before + (steps - step) * (z_after - z_before)."""
    return z_before + float(steps - step) * (z_after - z_before)


@dataclass(eq=False)
class ImageRequest:
    """One generate call in the batch. Events it gets from `step()`: ("start", None) after its first
    Euler step, ("partial", (k, x0 [n,4,48,48] numpy)) after the k-th step of `previews`, ("done",
    GenerateResult); `finish` is set when it left: "done", "cancelled" or "error" (`error`)."""

    ids: list[int]  # the generation prompt's ids (Pipeline.generate_request)
    n: int
    steps: int
    cfg_weight: float
    seed: int
    previews: list[int] = field(default_factory=list)  # step indices after which x0 is wanted
    done: int = 0  # Euler steps done
    finish: str | None = None
    error: InputError | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    # in the batch: its prefix rows (cond, uncond: one-row caches), its z while outside a step state
    cond: KVCache | None = None
    uncond: KVCache | None = None
    z: torch.Tensor | None = None  # [n, 4, 48, 48] on the device; None while the group's state carries it
    slot: int = 0  # its first image in the group's state
    group: Group | None = None

    @property
    def key(self) -> tuple[int, float]:
        return self.steps, self.cfg_weight


@dataclass(eq=False)
class Group:
    """Requests sharing one step call (one key), in row order; `state` None when it must be rebuilt."""

    key: tuple[int, float]
    reqs: list[ImageRequest] = field(default_factory=list)
    state: EulerState | None = None
    runner: StepRunner | None = None

    @property
    def images(self) -> int:
        return sum(r.n for r in self.reqs)


Event = tuple[ImageRequest, str, Any]


class ImageBatch:
    def __init__(self, engine: RuntimeEngine, capacity: int, step_images: int | None = None,
                 decode_thread: bool = False):
        """capacity: images in flight; step_images: images per step call (default: capacity);
        decode_thread: VAE decodes on a thread of their own (the backend must run two graphs at once)."""
        self.engine, self.backend, self.cfg = engine, engine.backend, engine.cfg
        self.pad_id = engine.processor.pad_id
        self.capacity, self.step_images = capacity, step_images or capacity
        self.groups: list[Group] = []  # in turn order
        self.waiting: deque[ImageRequest] = deque()
        self.unconds: OrderedDict[tuple[int, int], KVCache] = OrderedDict()  # (BOS id, length) -> row
        self.last_images = 0  # images in the last step call
        self.finished: deque[tuple[ImageRequest, np.ndarray]] = deque()  # (request, latents): VAE decode due
        self.decoder = ThreadPoolExecutor(1, "janusflow-vae", _lower_priority) if decode_thread else None
        self.decoding: deque[tuple[ImageRequest, Future[Event]]] = deque()  # on the decode thread, in order

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or bool(self.groups) or bool(self.finished) or bool(self.decoding)

    def close(self) -> None:
        """The decode thread ends (after the decode it runs, if any); pending decodes are dropped."""
        if self.decoder is not None:
            self.decoder.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> int:
        return sum(len(g.reqs) for g in self.groups)

    def submit(self, req: ImageRequest) -> None:
        """Queued; admitted when its images fit the capacity, or alone when it asks for more images than
        the capacity (up to the graphs' limit, which Pipeline.generate_request checked)."""
        self.waiting.append(req)

    def cancel(self, req: ImageRequest) -> None:
        """The request leaves now (its rows leave the next step, its VAE decode is dropped)."""
        if req in self.waiting:
            self.waiting.remove(req)
        self.finished = deque(f for f in self.finished if f[0] is not req)
        for r, fut in self.decoding:
            if r is req:
                fut.cancel()  # a decode already running finishes; its result is dropped
        self.decoding = deque(d for d in self.decoding if d[0] is not req)
        if req.group is not None:
            self._leave(req.group, req)
        req.finish = req.finish or "cancelled"

    def step(self) -> list[Event]:
        """One round: the results of the decodes the decode thread finished; waiting requests admitted
        while there is room, then one Euler step of a group with a request yet to make its first step;
        else (no decode thread) one finished request's VAE decode; else one Euler step of the group whose
        turn it is; with nothing to step, a wait of at most DECODE_POLL_S for a decode in flight.
        -> the events of that round, in row order."""
        out = self._decoded()
        self._admit()
        self.last_images = 0
        first = next((g for g in self.groups if any(r.done == 0 for r in g.reqs)), None)
        if first is None and self.finished:
            return out + [self._ended(self._decode(*self.finished.popleft()))]
        if not self.groups:
            if not out and self.decoding:
                wait([f for _, f in self.decoding], DECODE_POLL_S, FIRST_COMPLETED)
                out = self._decoded()
            return out
        g = first or self.groups[0]
        self.groups.remove(g)
        self.groups.append(g)  # its next turn after every other group's
        self.last_images = g.images
        return out + self._step(g)

    # -- membership -----------------------------------------------------------------------------
    def _admit(self) -> None:
        inflight = sum(g.images for g in self.groups)
        while self.waiting and (inflight + self.waiting[0].n <= self.capacity or not inflight):
            req = self.waiting.popleft()
            req.cond = prefix_row(self.backend, self.cfg, req.ids, self.pad_id, uncond=False)
            req.uncond = self._uncond(req.ids)
            req.z = initial_latents(req.n, req.seed).to(self.backend.device)  # the CLI's seeded noise
            # newcomers share a first step only with newcomers (their group merges after it: _step)
            g = next((g for g in self.groups if g.key == req.key and g.images + req.n <= self.step_images
                      and not any(r.done for r in g.reqs)), None)
            if g is None:
                g = Group(req.key)
                self.groups.append(g)
            self._freeze(g)
            g.reqs.append(req)
            req.group = g
            inflight += req.n

    def _uncond(self, ids: list[int]) -> KVCache:
        key = (ids[0], len(ids) - 1)
        row = self.unconds.pop(key, None)
        if row is None:
            row = prefix_row(self.backend, self.cfg, ids, self.pad_id, uncond=True)
        self.unconds[key] = row
        while len(self.unconds) > UNCOND_CACHE:
            self.unconds.popitem(last=False)
        return row

    def _freeze(self, g: Group) -> None:
        """Each request takes its z out of the group's state, which is then dropped (rebuilt at its next step)."""
        if g.state is not None:
            for r in g.reqs:
                if r.z is None:
                    r.z = g.state.z[r.slot:r.slot + r.n].clone()
        g.state = g.runner = None

    def _leave(self, g: Group, req: ImageRequest) -> None:
        self._freeze(g)
        g.reqs.remove(req)
        req.cond = req.uncond = req.z = req.group = None
        if not g.reqs:
            self.groups.remove(g)

    def _merge(self, g: Group) -> None:
        """g's requests (all past their first step) join a running group of their key with room, if any."""
        h = next((h for h in self.groups if h is not g and h.key == g.key and all(r.done for r in h.reqs)
                  and h.images + g.images <= self.step_images), None)
        if h is None:
            return
        self._freeze(g)
        self._freeze(h)
        for r in g.reqs:
            r.group = h
        h.reqs += g.reqs
        self.groups.remove(g)

    def _build(self, g: Group) -> EulerState:
        slot, zs, conds = 0, [], []
        for r in g.reqs:
            assert r.z is not None and r.cond is not None
            r.slot, slot = slot, slot + r.n
            zs.append(r.z)
            conds += [r.cond] * r.n
            r.z = None
        unconds = [r.uncond for r in g.reqs for _ in range(r.n)]
        cache = join_rows(self.backend, self.cfg, conds + unconds)  # type: ignore[operator]
        st = euler_state(self.backend, cache, torch.cat(zs), g.reqs[0].steps, g.reqs[0].cfg_weight)
        g.state, g.runner = st, StepRunner(self.backend, lambda: euler_step(self.backend, st))
        return st

    # -- one step ---------------------------------------------------------------------------------
    def _step(self, g: Group) -> list[Event]:
        st = g.state if g.state is not None else self._build(g)
        assert g.runner is not None
        steps = g.reqs[0].steps
        g.runner.write(st.t, row_timesteps([r.done for r in g.reqs for _ in range(r.n)], steps, st.t.device))
        before = {id(r): st.z[r.slot:r.slot + r.n].clone() for r in g.reqs if r.done in r.previews}
        g.runner()
        out: list[Event] = []
        for r in list(g.reqs):
            z = st.z[r.slot:r.slot + r.n]
            if r.done in r.previews:
                x0 = predicted_x0(before[id(r)], z, r.done, steps)
                out.append((r, "partial", (r.previews.index(r.done), x0.cpu().numpy())))
            r.done += 1
            if r.done == 1:
                out.append((r, "start", None))
            if r.done == steps:
                latents = z.to("cpu", torch.float32, copy=True).numpy()
                self._leave(g, r)
                if self.decoder is not None:
                    self.decoding.append((r, self.decoder.submit(self._decode, r, latents)))
                else:
                    self.finished.append((r, latents))  # decoded in a round of its own (newcomers first)
        if g.reqs and all(r.done for r in g.reqs):
            self._merge(g)
        return out

    def _decode(self, req: ImageRequest, latents: np.ndarray) -> Event:
        """The VAE decode of a finished request, checked as Pipeline.generate checks it. On the decode
        thread or the scheduler's: it reads the request and changes nothing but the backend's VAE."""
        try:
            self.engine.ensure_vae()
            images = final_images(latents, req.steps, lambda z: vae_decode(self.backend, z))
        except InputError as e:
            return req, "error", e
        return req, "done", GenerateResult(images=images, latents=latents,
                                           timings={"total_s": time.perf_counter() - req.t_submit})

    def _decoded(self) -> list[Event]:
        """The decode thread's finished decodes, in the order they were submitted."""
        out = []
        while self.decoding and self.decoding[0][1].done():
            out.append(self._ended(self.decoding.popleft()[1].result()))
        return out

    def _ended(self, ev: Event) -> Event:
        req, kind, payload = ev
        req.finish = kind
        if kind == "error":
            req.error = payload
        return ev
