"""The engine thread: the one place the model runs. It owns the Pipeline and takes jobs from a bounded
queue, one at a time, so requests never run the model on the event loop and never run it concurrently.

A job posts its results back to its request's asyncio queue (call_soon_threadsafe). It checks, between
two tokens or two Euler steps, whether its client went away or its time ran out, and then stops: the
rows it held are free for the next job at the next step.

Usage counts and finish reasons come from a tap on the Pipeline's engine (TokenTap), so the server
runs the Pipeline's own chat path (validation, seeding, detokenisation) rather than a copy of it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from janusflow_trt.api import Pipeline
from janusflow_trt.errors import JanusFlowError

from .metrics import Metrics
from .protocol import ServeError

log = logging.getLogger("janusflow.serve")


class Cancelled(Exception):
    """Raised inside a job (from the tap or the Euler callback) when its client left or its time ran out."""


class TokenTap:
    """Wraps a Pipeline's engine: forwards every call; on chat_tokens records the prompt length and the
    answer ids as they pass, and calls `check` before each token (a job's cancellation point)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.prompt_tokens = 0
        self.ids: list[int] = []
        self.check: Callable[[], None] = lambda: None

    def chat_tokens(self, inputs, params) -> Iterator[int]:
        self.prompt_tokens, self.ids = int(inputs.input_ids.shape[1]), []
        for t in self.engine.chat_tokens(inputs, params):
            self.ids.append(t)
            yield t
            self.check()  # before the next decode step

    def prefix(self, prompt: str, num_images: int):
        return self.engine.prefix(prompt, num_images)

    def euler(self, prefix, z0: torch.Tensor, steps: int, cfg_weight: float) -> Iterator[torch.Tensor]:
        return self.engine.euler(prefix, z0, steps, cfg_weight)

    def ensure_vae(self) -> None:
        self.engine.ensure_vae()

    def vae(self, z: torch.Tensor) -> torch.Tensor:
        return self.engine.vae(z)


@dataclass
class Job:
    """One request's work. `work(pipe, tap, job)` runs on the engine thread and posts events; the engine
    posts ("error", ServeError) if it raises. Events: ("delta", ...), ("done", ...), ("error", ServeError)."""

    endpoint: str
    work: Callable[[Pipeline, TokenTap, Job], None]
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic()
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("the client went away")
        if time.monotonic() > self.deadline:
            raise Cancelled("timed out")

    async def next(self) -> tuple[str, Any]:
        """The next event; a ServeError for an error event or when the deadline passes first."""
        try:
            kind, payload = await asyncio.wait_for(self.events.get(), max(self.deadline - time.monotonic(), 0.0))
        except TimeoutError:
            self.cancelled.set()
            raise ServeError(504, "the request timed out in the server", type="timeout", code="timeout") from None
        if kind == "error":
            raise payload
        return kind, payload


class EngineLoop:
    """A daemon thread running jobs from a bounded queue: full -> 429 with Retry-After."""

    def __init__(self, pipe: Pipeline, max_queue: int, metrics: Metrics):
        self.tap = TokenTap(pipe.engine)
        # the same Pipeline over the tapped engine (Pipeline's public constructor; its calls are unchanged)
        self.pipe = Pipeline(pipe.cfg, pipe.processor, self.tap, pipe.backend)
        self.jobs: queue.Queue[Job] = queue.Queue(max_queue)
        self.metrics = metrics
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="janusflow-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stop.is_set()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ServeError(429, f"the server's queue is full ({self.jobs.maxsize} requests waiting); retry later",
                             type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.queue_depth.set(self.jobs.qsize())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            self.metrics.queue_depth.set(self.jobs.qsize())
            self.metrics.running.set(1)
            try:
                job.check()
                self.tap.check = job.check
                job.work(self.pipe, self.tap, job)
            except Cancelled as e:
                job.post("error", ServeError(504 if "timed out" in str(e) else 499, f"the request was {e}",
                                             type="timeout", code="cancelled"))
            except JanusFlowError as e:  # the pipeline's one-line refusal of bad input
                job.post("error", ServeError(400, str(e), code="invalid_value"))
            except ServeError as e:
                job.post("error", e)
            except Exception:  # a bug: logged here with its traceback; the client gets one generic line
                log.exception("%s request failed", job.endpoint)
                job.post("error", ServeError(500, "internal server error", type="server_error"))
            finally:
                self.tap.check = lambda: None
                self.metrics.running.set(0)
