"""Continuous batching of chat: up to `max_batch` requests decode together as the rows of one KV cache
(runtime/decode.py's DecodeRows). Between two decode steps the scheduler admits a waiting request and
retires rows at EOS, at the token limit, on an error or when the caller cancels them. The step knows
nothing of requests.

Chunked prefill: a joining request is prefilled alone into a one-row cache (runtime/llm.py's prefill,
which appends to what the cache holds) `prefill_chunk` prompt tokens per round, after the round's decode
step, so a long prompt (576 image tokens and the question) delays the running rows by about one chunk
per token instead of by its whole prefill; its SigLIP + embedding pass is one round of its own. When it
is done the row is copied into the first free row of the batch (KVCache.fill_row) and decodes from the
next round. The running rows stay at the front (a leaving row's place is taken by the last running one,
DecodeRows.stop), so a decode step computes the running rows only. With no row decoding there is nobody
to stall: the whole prompt runs in one round, through the same chunks (the chunk boundaries never depend
on the companions, so neither do the numerics).

A request's answer equals its solo Pipeline.chat with the same seed: greedy rows take the argmax; a
sampled row draws from its own torch.Generator seeded with the request's seed (on the CPU the same
stream as torch.manual_seed(seed), which the solo path seeds), so its companions do not change it.
The scheduler runs on one thread (the server's engine thread); it is not thread-safe.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from janusflow_trt.errors import InputError
from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.janusflow_ref.processor import ChatInputs
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.runtime.backends import Backend
from janusflow_trt.runtime.chat import prompt_embeds
from janusflow_trt.runtime.decode import DecodeRows, checked_id, token_id
from janusflow_trt.runtime.kv_cache import KVCache
from janusflow_trt.runtime.llm import new_cache, prefill

# Prompt tokens prefilled per round while rows decode. Small preset, ORT FP32 on 2 cores: 64 tokens of
# prefill cost about one 8-row decode step (docs/serving.md, chunked prefill); the tiny tests use less.
PREFILL_CHUNK = 64


@dataclass(eq=False)
class ChatRequest:
    """One answer in the batch. `tokens` grow as they are sampled; `finish` is set when it left its row:
    "stop" (the end-of-sentence token, included in tokens), "length", "cancelled" or "error" (`error`)."""

    inputs: ChatInputs  # Processor.chat_inputs, checked against the context by the caller
    params: SamplingParams
    seed: int
    ignore_eos: bool = False  # EOS is sampled and kept as any token: the answer ends at its limit
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    error: InputError | None = None
    row: int | None = None


@dataclass(eq=False)
class Joining:
    """A request being prefilled: its one-row cache (capacity: the prompt) and prompt embeddings [1, T, H]
    (None until its SigLIP round ran); `logits` [1, V] of the last position once all T are in."""

    req: ChatRequest
    cache: KVCache | None = None
    embeds: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @property
    def done(self) -> int:
        return 0 if self.cache is None else self.cache.length


class ChatBatch:
    def __init__(self, backend: Backend, cfg: JanusFlowConfig, eos_id: int, max_batch: int,
                 prefill_chunk: int = PREFILL_CHUNK):
        assert prefill_chunk >= 1, prefill_chunk
        self.backend, self.cfg, self.eos_id, self.chunk = backend, cfg, eos_id, prefill_chunk
        self.cache = new_cache(backend, cfg, max_batch, 1)
        self.rows = DecodeRows(backend, self.cache)
        self.active: list[ChatRequest | None] = [None] * max_batch
        self.waiting: deque[ChatRequest] = deque()
        self.joining: Joining | None = None

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.joining is not None or any(q is not None for q in self.active)

    def submit(self, req: ChatRequest) -> None:
        self.waiting.append(req)

    def cancel(self, req: ChatRequest) -> None:
        """The request leaves now (its row is free for the next admission)."""
        if req in self.waiting:
            self.waiting.remove(req)
        if self.joining is not None and self.joining.req is req:
            self.joining = None
        if req.row is not None:
            self._retire(req)
        req.finish = req.finish or "cancelled"

    def step(self) -> list[tuple[ChatRequest, int | None]]:
        """One round: a decode step for the running rows, then one round of the joining request's prefill
        (all of it when no row decodes), which takes the next waiting request when there is a free row.
        -> (request, token) in the order sampled, token None for a request that failed; a request whose
        `finish` is set has left its row."""
        out: list[tuple[ChatRequest, int | None]] = []
        running = [q for q in self.active if q is not None]
        if running:
            self.rows.step()
            ids = self.rows.ids.view(-1).tolist()  # THE host read of the step: [B] ids
            got = [(q, ids[q.row]) for q in running if q.row is not None]  # read before a retire moves a row
            out += [self._emit(q, t) for q, t in got]
        while True:  # without running rows: admit as many as there are free rows, each in one go
            if self.joining is None and self.waiting and None in self.active:
                self.joining = Joining(self.waiting.popleft())
            if self.joining is None:
                return out
            joined = self._prefill(self.joining, whole=not running)
            if joined is None:
                return out
            out.append(joined)
            if running:
                return out

    def _prefill(self, j: Joining, whole: bool) -> tuple[ChatRequest, int | None] | None:
        """One round of j's prefill: its SigLIP + embedding pass, or its next chunk; all of it if `whole`.
        -> its first token once its row is admitted, else None."""
        if j.embeds is None:
            j.embeds = prompt_embeds(self.backend, j.req.inputs)
            j.cache = new_cache(self.backend, self.cfg, 1, j.embeds.shape[1], exact=True)
            if not whole:
                return None
        assert j.cache is not None
        total = j.embeds.shape[1]
        while j.done < total:
            j.logits = prefill(self.backend, j.cache, j.embeds[:, j.done:j.done + self.chunk])["logits"]
            if not whole:
                break
        if j.done < total:
            return None
        self.joining = None
        return self._admit(self.rows.count, j)

    def _admit(self, r: int, j: Joining) -> tuple[ChatRequest, int | None]:
        req = j.req
        assert j.cache is not None and j.logits is not None
        self.cache.fill_row(r, j.cache)
        gen = None
        if not req.params.greedy:
            gen = torch.Generator(device=self.backend.device).manual_seed(req.seed)
        self.rows.start(r, j.logits, req.params, gen)
        self.active[r], req.row = req, r
        return self._emit(req, token_id(self.rows.ids[r], 0, req.params))

    def _emit(self, req: ChatRequest, t: int) -> tuple[ChatRequest, int | None]:
        try:
            tok: int | None = checked_id(t, len(req.tokens), req.params)
        except InputError as e:
            req.error, req.finish, tok = e, "error", None
        if tok is not None:
            req.tokens.append(tok)
            if tok == self.eos_id and not req.ignore_eos:
                req.finish = "stop"
            elif len(req.tokens) == req.params.max_new_tokens:
                req.finish = "length"
        if req.finish:
            self._retire(req)
        return req, tok

    def _retire(self, req: ChatRequest) -> None:
        """req leaves its row; the last running request moves into it (the rows stay compact)."""
        r = req.row
        assert r is not None and self.active[r] is req, f"{req} holds no row"
        moved = self.rows.stop(r)
        req.row = None
        if moved is None:
            self.active[r] = None
            return
        other = self.active[moved]
        assert other is not None
        self.active[r], self.active[moved], other.row = other, None, r
