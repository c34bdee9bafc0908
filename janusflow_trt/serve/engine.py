"""The engine thread: the one place the model runs. It owns the Pipeline and takes jobs from a bounded
queue, so requests never run the model on the event loop and never run it concurrently.

On the runtime backends, chat jobs are rows of one scheduler (janusflow_trt/batch.py) at every
--max-batch N (N = 1 included: one chat path): up to N answers decode together, a job joins between two
decode steps and leaves at its end, a stop string, a disconnect or its deadline. With --max-batch N > 1,
image jobs are rows of another (janusflow_trt/image_batch.py): up to min(N, the graphs' image limit)
images share each Euler step call, a request joins at the next step boundary. The loop interleaves them:
one chat decode step, then one Euler step, so neither starves. At --max-batch 1 an image job (and any
job on the `torch` reference backend) runs alone; the chat rows wait for it.

A job posts its results back to its request's asyncio queue (call_soon_threadsafe); the events of one
batched round go in one wakeup of the event loop (Outbox). It checks, between
two tokens or two Euler steps, whether its client went away or its time ran out, and then stops: the
rows it held are free for the next job at the next step.

A solo job (images at --max-batch 1; chat on `torch`) runs the Pipeline's own path; its usage counts
and finish reasons come from a tap on the Pipeline's engine (TokenTap). A chat row takes the Pipeline's
validation (`chat_request`) and detokeniser, and the scheduler runs the runtime's one decode step.
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
from janusflow_trt.export.specs import build_specs, max_images
from janusflow_trt.image_batch import ImageBatch, ImageRequest

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


class ImageRows(Protocol):
    """An image job's side of the Euler-step scheduler (serve/images.py: BatchedImage)."""

    req: ImageRequest
    job: Job

    def event(self, kind: str, payload: Any) -> None: ...  # ImageBatch's events, posted to the job


class Outbox:
    """Events the engine thread posts during one batched round, delivered at the round's end in one
    wakeup per event loop (call_soon_threadsafe), in the order posted. A wakeup per token per request
    cost the engine thread about 8% of its time at 8 chat clients (small preset, 2 cores; py-spy:
    docs/serving.md): the wakeup's write lets the event loop's thread take the GIL, and the engine waits
    to get it back. Outside a round (a solo job streaming its tokens) and on other threads, a post is
    delivered at once."""

    def __init__(self) -> None:
        self.held: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple[str, Any]]]] | None = None
        self.owner: int | None = None

    def post(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, item: tuple[str, Any]) -> None:
        if self.held is not None and threading.get_ident() == self.owner:
            self.held.setdefault(loop, []).append((events, item))
        else:
            _deliver(loop, [(events, item)])

    @contextlib.contextmanager
    def round(self) -> Iterator[None]:
        self.held, self.owner = {}, threading.get_ident()
        try:
            yield
        finally:
            held, self.held, self.owner = self.held, None, None
            for loop, items in held.items():
                _deliver(loop, items)


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, tuple[str, Any]]]) -> None:
    def put() -> None:
        for events, item in items:
            events.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # the event loop is closed: the server is shutting down
        pass


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
    image_rows: Callable[[Pipeline, Job], ImageRows] | None = None  # an image job's, when the engine batches
    outbox: Outbox | None = None  # the engine's (EngineLoop.submit)

    def post(self, kind: str, payload: Any = None) -> None:
        if self.outbox is not None:
            self.outbox.post(self.loop, self.events, (kind, payload))
        else:
            _deliver(self.loop, [(self.events, (kind, payload))])

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

    def __init__(self, pipe: Pipeline, max_queue: int, metrics: Metrics, max_batch: int = 1,
                 image_step_images: int | None = None):
        self.tap = TokenTap(pipe.engine)
        # the same Pipeline over the tapped engine (Pipeline's public constructor; its calls are unchanged)
        self.pipe = Pipeline(pipe.cfg, pipe.processor, self.tap, pipe.backend)
        self.jobs: queue.Queue[Job] = queue.Queue(max_queue)
        self.metrics = metrics
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="janusflow-engine", daemon=True)
        self.max_batch, self.rows = max_batch, {}  # rows: ChatRequest -> its job's Rows
        self.batch: ChatBatch | None = None
        self.images: ImageBatch | None = None
        self.image_jobs: dict[ImageRequest, ImageRows] = {}
        self._held: Job | None = None  # taken from the queue, waiting for room in its batch
        self.outbox = Outbox()
        self.image_step_images = image_step_images  # images per Euler step call (None: the image capacity)
        if isinstance(pipe.engine, RuntimeEngine):  # chat rows at any --max-batch: one serve chat path
            if max_batch > (limit := max_batch_limit(pipe)):
                raise InputError(f"--max-batch {max_batch} is beyond the llm graph's batch limit ({limit})")
            self.engine = pipe.engine
            self.batch = self._new_batch()
            if max_batch > 1:
                self.images = self._new_images()
        elif max_batch > 1:
            raise InputError(f"--max-batch {max_batch} needs a runtime backend (ort, trt, torch-fast, "
                             f"torch-cuda), not {pipe.backend}")

    def _new_batch(self) -> ChatBatch:
        return ChatBatch(self.engine.backend, self.pipe.cfg, self.pipe.processor.eos_id, self.max_batch)

    def _new_images(self) -> ImageBatch:
        # VAE decodes on a thread of their own except on capturable backends (image_batch.py says why)
        return ImageBatch(self.engine, min(self.max_batch, max_images(build_specs(self.pipe.cfg))),
                          self.image_step_images or self._default_step_images(),
                          decode_thread=not self.engine.backend.capturable)

    def _default_step_images(self) -> int | None:
        """Images per Euler step call unless --image-step-images says: one on the CPU, where a bigger
        call costs more per image (small preset, ORT, 2 cores: a 4-image call about 2x per image,
        docs/serving.md), so requests time-slice; all that fit on an accelerator (None)."""
        return 1 if self.engine.backend.device.type == "cpu" else None

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.thread.join(timeout)
        if self.images is not None:
            self.images.close()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stop.is_set()

    def submit(self, job: Job) -> None:
        job.outbox = self.outbox
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ServeError(429, f"the server's queue is full ({self.jobs.maxsize} requests waiting); retry later",
                             type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.queue_depth.set(self.jobs.qsize())

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = (self.batch is not None and self.batch.busy) or (self.images is not None and self.images.busy)
            self._take(block=not busy)
            if self.batch is not None and self.batch.busy:
                with self.outbox.round():
                    self._round()
            if self.images is not None and self.images.busy:
                with self.outbox.round():
                    self._image_round()

    def _take(self, block: bool) -> None:
        """Jobs from the queue while they fit: a batched chat joins the chat batch while it has a free row,
        a batched image job the image batch while fewer than its capacity of images wait (each admitted at
        its batch's next round); a job that does not fit is held, first in line, until it does. Any other
        job runs now, alone."""
        while True:
            job = self._held
            if job is None:
                try:
                    job = self.jobs.get(timeout=0.1) if block else self.jobs.get_nowait()
                except queue.Empty:
                    return
                block = False
                self.metrics.queue_depth.set(self.jobs.qsize())
            self._held = None
            if self.images is not None and job.image_rows is not None:
                if sum(r.n for r in self.images.waiting) >= self.images.capacity:
                    self._held = job
                    return
                with self._errors(job):
                    job.check()
                    img = job.image_rows(self.pipe, job)
                    self.images.submit(img.req)
                    self.image_jobs[img.req] = img
                self.metrics.running_images.set(len(self.image_jobs))
                continue
            if self.batch is not None and job.batched is not None and len(self.rows) >= self.max_batch:
                self._held = job
                return
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
        events = self._batch_step("chat", self.rows, self._leave, self.batch.step)
        if events is None:
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

    def _image_round(self) -> None:
        """Between two Euler steps: image jobs whose client left or whose time ran out leave; then one
        step of the image batch; each job gets its events (start, partial images, its result)."""
        images = self.images
        assert images is not None

        def timed_step() -> list:
            t0 = time.perf_counter()
            events = images.step()
            if images.last_images:  # a step call (not a decode, nor a wait for one)
                self.metrics.euler_round.observe(time.perf_counter() - t0)
            return events

        events = self._batch_step("image", self.image_jobs, self._image_leave, timed_step)
        if events is None:
            images.close()
            self.images = self._new_images()
            return
        if images.last_images:
            self.metrics.step_images.observe(images.last_images)
        for req, kind, payload in events:
            img = self.image_jobs[req]
            with self._errors(img.job, leave=lambda r=req: self._image_leave(r)):
                if kind == "error":
                    raise payload
                img.event(kind, payload)
                if req.finish:
                    del self.image_jobs[req]
        self.metrics.running_images.set(len(self.image_jobs))

    def _batch_step(self, kind: str, jobs: dict, leave: Callable[[Any], None], step: Callable[[], list]) -> list | None:
        """One round of a batch (chat or image): jobs whose client left or whose time ran out leave first;
        then `step`. A failing step is a bug: every job in the batch gets a 500 and None is returned (the
        caller starts the batch afresh)."""
        for req, held in list(jobs.items()):
            with self._errors(held.job, leave=lambda r=req: leave(r)):
                held.job.check()
        try:
            return step()
        except Exception:
            log.exception("%s batch step failed", kind)
            for held in jobs.values():
                held.job.post("error", ServeError(500, "internal server error", type="server_error"))
            jobs.clear()
            return None

    def _image_leave(self, req: ImageRequest) -> None:
        assert self.images is not None
        self.images.cancel(req)
        self.image_jobs.pop(req, None)

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
