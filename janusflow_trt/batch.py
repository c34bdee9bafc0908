"""Continuous batching of chat: up to `max_batch` requests decode together as the rows of one KV cache
(runtime/decode.py's DecodeRows). Between two decode steps the scheduler admits waiting requests (each
prefilled alone, runtime/chat.py's chat_prefill, then copied into a free row) and retires rows at EOS,
at the token limit, on an error or when the caller cancels them. The step knows nothing of requests.

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
from janusflow_trt.runtime.chat import chat_prefill
from janusflow_trt.runtime.decode import DecodeRows, checked_id, token_id
from janusflow_trt.runtime.llm import new_cache


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


class ChatBatch:
    def __init__(self, backend: Backend, cfg: JanusFlowConfig, eos_id: int, max_batch: int):
        self.backend, self.cfg, self.eos_id = backend, cfg, eos_id
        self.cache = new_cache(backend, cfg, max_batch, 1)
        self.rows = DecodeRows(backend, self.cache)
        self.active: list[ChatRequest | None] = [None] * max_batch
        self.waiting: deque[ChatRequest] = deque()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(q is not None for q in self.active)

    def submit(self, req: ChatRequest) -> None:
        self.waiting.append(req)

    def cancel(self, req: ChatRequest) -> None:
        """The request leaves now (its row is free for the next admission)."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req.row is not None:
            self._retire(req.row)
        req.finish = req.finish or "cancelled"

    def step(self) -> list[tuple[ChatRequest, int | None]]:
        """One round: a decode step for the running rows, then waiting requests admitted into free rows
        (their first token). -> (request, token) in the order sampled, token None for a request that
        failed; a request whose `finish` is set has left its row."""
        out: list[tuple[ChatRequest, int | None]] = []
        running = [r for r, q in enumerate(self.active) if q is not None]
        if running:
            self.rows.step()
            ids = self.rows.ids.view(-1).tolist()  # THE host read of the step: [B] ids
            out += [self._emit(r, ids[r]) for r in running]
        for r, q in enumerate(self.active):
            if q is None and self.waiting:
                out.append(self._admit(r, self.waiting.popleft()))
        return out

    def _admit(self, r: int, req: ChatRequest) -> tuple[ChatRequest, int | None]:
        solo, logits = chat_prefill(self.backend, self.cfg, req.inputs)
        self.cache.fill_row(r, solo)
        gen = None
        if not req.params.greedy:
            gen = torch.Generator(device=self.backend.device).manual_seed(req.seed)
        self.rows.start(r, logits, req.params, gen)
        self.active[r], req.row = req, r
        return self._emit(r, token_id(self.rows.ids[r], 0, req.params))

    def _emit(self, r: int, t: int) -> tuple[ChatRequest, int | None]:
        req = self.active[r]
        assert req is not None, f"row {r} is free"
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
            self._retire(r)
        return req, tok

    def _retire(self, r: int) -> None:
        req = self.active[r]
        assert req is not None, f"row {r} is free"
        self.rows.stop(r)
        self.active[r], req.row = None, None
