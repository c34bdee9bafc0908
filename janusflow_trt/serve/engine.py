"""The engine thread: the one place the model runs. It owns the Pipeline and takes jobs from a bounded
queue, so requests never run the model on the event loop and never run it concurrently.

On the runtime backends, chat jobs are rows of one scheduler (janusflow_trt/batch.py) at every
--max-batch N (N = 1 included: one chat path): up to N answers decode together, a job joins between two
decode steps and leaves at its end, a stop string, a disconnect or its deadline. Image jobs (and chat
on the `torch` reference backend) run one at a time, alone; the chat rows wait for them.

A job posts its results back to its request's asyncio queue (call_soon_threadsafe). It checks, between
two tokens or two Euler steps, whether its client went away or its time ran out, and then stops: the
rows it held are free for the next job at the next step.

A solo job (images; chat on `torch`) runs the Pipeline's own path; its usage counts and finish reasons
come from a tap on the Pipeline's engine (TokenTap). A chat row takes the Pipeline's validation
(`chat_request`) and detokeniser, and the scheduler runs the runtime's one decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from janusflow_trt.api import Pipeline
from janusflow_trt.batch import ChatBatch, ChatRequest
from janusflow_trt.engines import RuntimeEngine
from janusflow_trt.errors import InputError, JanusFlowError
from janusflow_trt.export.specs import build_specs

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


class Rows(Protocol):
    """A chat job's side of the scheduler (serve/chat.py: BatchedChat)."""

    req: ChatRequest
    job: Job

    def token(self, tok: int) -> bool: ...  # True: a stop string ended the answer

    def done(self, hit: bool) -> None: ...


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
    batched: Callable[[Pipeline, Job], Rows] | None = None  # a chat job's rows, when the engine batches

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


def max_batch_limit(pipe: Pipeline) -> int:
    """The most rows one decode step may hold: the llm graph's batch limit."""
    return build_specs(pipe.cfg)["llm"].syms["B"].max


class EngineLoop:
    """A daemon thread running jobs from a bounded queue: full -> 429 with Retry-After."""

    def __init__(self, pipe: Pipeline, max_queue: int, metrics: Metrics, max_batch: int = 1):
        self.tap = TokenTap(pipe.engine)
        # the same Pipeline over the tapped engine (Pipeline's public constructor; its calls are unchanged)
        self.pipe = Pipeline(pipe.cfg, pipe.processor, self.tap, pipe.backend)
        self.jobs: queue.Queue[Job] = queue.Queue(max_queue)
        self.metrics = metrics
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="janusflow-engine", daemon=True)
        self.max_batch, self.rows = max_batch, {}  # rows: ChatRequest -> its job's Rows
        self.batch: ChatBatch | None = None
        if isinstance(pipe.engine, RuntimeEngine):  # chat rows at any --max-batch: one serve chat path
            if max_batch > (limit := max_batch_limit(pipe)):
                raise InputError(f"--max-batch {max_batch} is beyond the llm graph's batch limit ({limit})")
            self.engine = pipe.engine
            self.batch = self._new_batch()
        elif max_batch > 1:
            raise InputError(f"--max-batch {max_batch} needs a runtime backend (ort, trt, torch-fast, "
                             f"torch-cuda), not {pipe.backend}")

    def _new_batch(self) -> ChatBatch:
        return ChatBatch(self.engine.backend, self.pipe.cfg, self.pipe.processor.eos_id, self.max_batch)

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
            busy = self.batch is not None and self.batch.busy
            self._take(block=not busy)
            if self.batch is not None and self.batch.busy:
                self._round()

    def _take(self, block: bool) -> None:
        """Jobs from the queue while the batch has a free row: a batched chat joins it (admitted at the
        next round), any other job runs now, alone."""
        while len(self.rows) < self.max_batch:
            try:
                job = self.jobs.get(timeout=0.1) if block else self.jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            self.metrics.queue_depth.set(self.jobs.qsize())
            if self.batch is not None and job.batched is not None:
                with self._errors(job):
                    job.check()
                    rows = job.batched(self.pipe, job)
                    self.batch.submit(rows.req)
                    self.rows[rows.req] = rows
                self.metrics.running.set(len(self.rows))
                continue
            self.metrics.running.set(1)
            try:
                with self._errors(job):
                    job.check()
                    self.tap.check = job.check
                    job.work(self.pipe, self.tap, job)
            finally:
                self.tap.check = lambda: None
                self.metrics.running.set(len(self.rows))

    def _round(self) -> None:
        """Between two steps: rows whose client left or whose time ran out leave; then one scheduler
        round; each job gets its tokens, a finished one its end."""
        assert self.batch is not None
        for req, rows in list(self.rows.items()):
            with self._errors(rows.job, leave=lambda r=req: self._leave(r)):
                rows.job.check()
        try:
            events = self.batch.step()
        except Exception:  # a bug: every job in the batch fails, the batch starts afresh
            log.exception("chat batch step failed")
            for rows in self.rows.values():
                rows.job.post("error", ServeError(500, "internal server error", type="server_error"))
            self.rows.clear()
            self.batch = self._new_batch()
            return
        for req, tok in events:
            rows = self.rows[req]
            with self._errors(rows.job, leave=lambda r=req: self._leave(r)):
                if tok is None:
                    raise req.error or JanusFlowError("the answer failed")
                hit = rows.token(tok)
                if hit and not req.finish:
                    self.batch.cancel(req)
                if req.finish:
                    del self.rows[req]
                    rows.done(hit)
        self.metrics.running.set(len(self.rows))

    def _leave(self, req: ChatRequest) -> None:
        assert self.batch is not None
        self.batch.cancel(req)
        self.rows.pop(req, None)

    @contextlib.contextmanager
    def _errors(self, job: Job, leave: Callable[[], None] = lambda: None) -> Iterator[None]:
        """A job's failure as its error event (`leave` first: its row is freed)."""
        try:
            yield
            return
        except Cancelled as e:
            err = ServeError(504 if "timed out" in str(e) else 499, f"the request was {e}", type="timeout",
                             code="cancelled")
        except JanusFlowError as e:  # the pipeline's one-line refusal of bad input
            err = ServeError(400, str(e), code="invalid_value")
        except ServeError as e:
            err = e
        except Exception:  # a bug: logged here with its traceback; the client gets one generic line
            log.exception("%s request failed", job.endpoint)
            err = ServeError(500, "internal server error", type="server_error")
        leave()
        job.post("error", err)
