"""POST /v1/chat/completions: an OpenAI chat request -> a row of the engine's chat scheduler (on the
`torch` reference backend: one Pipeline.chat_stream call) -> a chat.completion, or server-sent
chat.completion.chunk events (on the runtime backends one per sampled token, its content "" when the
token completes no text yet).

JanusFlow's chat is one image and one question under a system prompt (Processor.chat_inputs), so a
request holds system / developer messages (joined into the system prompt; the model's default when
there are none) and exactly one user message with one image_url part and its text parts."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from janusflow_trt.api import Pipeline
from janusflow_trt.batch import ChatRequest
from janusflow_trt.janusflow_ref.processor import SYSTEM_PROMPT

from .engine import Job, TokenTap
from .media import decode_data_url
from .metrics import Metrics
from .protocol import MAX_STOP, ChatCompletionRequest, ImagePart, Message, ServeError, TextPart

DEFAULT_MAX_TOKENS = 512  # as the CLI's --max-new-tokens; never beyond what the context has left


@dataclass
class ChatCall:
    image: Image.Image
    question: str
    system_prompt: str
    max_tokens: int | None  # None: the default, bounded by the context
    temperature: float
    top_p: float
    seed: int
    stops: list[str]
    ignore_eos: bool = False


def _text(m: Message, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    if any(isinstance(p, ImagePart) for p in m.content):
        raise ServeError(400, f"messages.{i}: only a user message may hold an image", param=f"messages.{i}")
    return "\n".join(p.text for p in m.content if isinstance(p, TextPart))


def chat_call(req: ChatCompletionRequest) -> ChatCall:
    """The request's fields checked and turned into the Pipeline's arguments (the image decoded: call it
    off the event loop)."""
    if req.n != 1:
        raise ServeError(400, f"n={req.n}: one choice per request is supported", param="n")
    if req.logprobs:
        raise ServeError(400, "logprobs are not supported", param="logprobs")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP or not all(stops):
        raise ServeError(400, f"stop: at most {MAX_STOP} non-empty strings", param="stop")
    system = [_text(m, i) for i, m in enumerate(req.messages) if m.role in ("system", "developer")]
    users = [(i, m) for i, m in enumerate(req.messages) if m.role == "user"]
    others = [i for i, m in enumerate(req.messages) if m.role not in ("system", "developer", "user")]
    if others or len(users) != 1:
        raise ServeError(400, "one user message (and optional system messages) per request: multi-turn "
                              "conversations are not supported", param="messages")
    i, user = users[0]
    parts = [user.content] if isinstance(user.content, str) or user.content is None else user.content
    images = [(j, p) for j, p in enumerate(parts) if isinstance(p, ImagePart)]
    if len(images) != 1:
        raise ServeError(400, f"messages.{i}.content: JanusFlow answers about exactly one image per request "
                              f"(one image_url part), got {len(images)}", param=f"messages.{i}.content")
    question = "\n".join(p.text if isinstance(p, TextPart) else p for p in parts
                         if isinstance(p, TextPart | str))
    j, part = images[0]
    image = decode_data_url(part.image_url.url, f"messages.{i}.content.{j}.image_url.url")
    return ChatCall(image=image, question=question, system_prompt="\n".join(system) if system else SYSTEM_PROMPT,
                    max_tokens=req.max_completion_tokens or req.max_tokens,
                    temperature=0.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p, seed=42 if req.seed is None else req.seed,
                    stops=stops, ignore_eos=req.ignore_eos)


class StopMatcher:
    """Stop strings over a stream of text pieces: text is released only once no stop string can start in
    it, and the first stop string found ends the answer (excluded from it, as OpenAI does)."""

    def __init__(self, stops: list[str]):
        self.stops, self.hold, self.buf = stops, max((len(s) for s in stops), default=1) - 1, ""

    def feed(self, piece: str) -> tuple[str, bool]:
        self.buf += piece
        hits = [k for s in self.stops if (k := self.buf.find(s)) >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        cut = max(len(self.buf) - self.hold, 0)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def max_tokens(pipe: Pipeline, call: ChatCall) -> int:
    """The answer's token limit, checked against the context with the request's own field names."""
    proc, limit = pipe.processor, pipe.cfg.max_context
    # the same ids Processor.chat_inputs builds, without preprocessing the image
    prompt = len(proc.expand_image_tokens(proc.encode(proc.chat_prompt(call.question, call.system_prompt))))
    if prompt >= limit:
        raise ServeError(400, f"the prompt is {prompt} tokens; the model's context is {limit}", param="messages",
                         code="context_length_exceeded")
    if call.max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, limit - prompt)
    if prompt + call.max_tokens > limit:
        raise ServeError(400, f"the prompt ({prompt} tokens) + max_tokens ({call.max_tokens}) exceeds the model's "
                              f"context ({limit} tokens)", param="max_tokens", code="context_length_exceeded")
    return call.max_tokens


def chat_work(call: ChatCall):
    """The job's work on the engine thread: posts ("delta", text) pieces, then ("done", usage, finish)."""

    def work(pipe: Pipeline, tap: TokenTap, job: Job) -> None:
        if call.ignore_eos:  # the Pipeline's own loop ends at EOS; the scheduler's rows can go on
            raise ServeError(400, f"ignore_eos needs a runtime backend (ort, trt, torch-fast, torch-cuda), not "
                                  f"{pipe.backend}", param="ignore_eos")
        stream = pipe.chat_stream(call.image, call.question, max_new_tokens=max_tokens(pipe, call),
                                  temperature=call.temperature, top_p=call.top_p, seed=call.seed,
                                  system_prompt=call.system_prompt)
        stop = StopMatcher(call.stops)
        hit = False
        for piece in stream:
            text, hit = stop.feed(piece)
            if text:
                job.post("delta", text)
            if hit:
                stream.close()  # the decode loop ends here; its cache is dropped with it
                break
        if not hit and (rest := stop.flush()):
            job.post("delta", rest)
        eos = bool(tap.ids) and tap.ids[-1] == pipe.processor.eos_id
        usage = {"prompt_tokens": tap.prompt_tokens, "completion_tokens": len(tap.ids),
                 "total_tokens": tap.prompt_tokens + len(tap.ids)}
        job.post("done", (usage, "stop" if hit or eos else "length"))

    return work


class BatchedChat:
    """A chat job run by the engine's scheduler (--max-batch > 1): its ChatRequest, and chat_work's
    detokenisation, stop strings and events for the tokens the scheduler hands it."""

    def __init__(self, pipe: Pipeline, call: ChatCall, job: Job):
        inputs, params = pipe.chat_request(call.image, call.question, max_tokens(pipe, call), call.temperature,
                                           call.top_p, call.seed, call.system_prompt)
        self.req = ChatRequest(inputs, params, call.seed, ignore_eos=call.ignore_eos)
        self.job = job
        self.detok, self.stop = pipe.detokenizer(), StopMatcher(call.stops)

    def _feed(self, piece: str, always: bool = False) -> bool:
        text, hit = self.stop.feed(piece)
        if text or always:
            self.job.post("delta", text)
        return hit

    def token(self, tok: int) -> bool:
        """Posts the text the token completes, "" when it completes none (a character or a stop string
        still open, a special token): one event per token, so a stream's chunks time the tokens. True
        when a stop string ended the answer."""
        return self._feed(self.detok.put(tok), always=True)

    def done(self, hit: bool) -> None:
        """The answer's rest, then ("done", usage, finish), as chat_work posts them."""
        if not hit:
            hit = self._feed(self.detok.end())
            if not hit and (rest := self.stop.flush()):
                self.job.post("delta", rest)
        ids, prompt = self.req.tokens, int(self.req.inputs.input_ids.shape[1])
        usage = {"prompt_tokens": prompt, "completion_tokens": len(ids), "total_tokens": prompt + len(ids)}
        self.job.post("done", (usage, "stop" if hit or self.req.finish == "stop" else "length"))


def batched_chat(call: ChatCall):
    def start(pipe: Pipeline, job: Job) -> BatchedChat:
        return BatchedChat(pipe, call, job)

    return start


class Reply:
    """Builds the response objects of one request (one id, one created time)."""

    def __init__(self, model: str, metrics: Metrics, t0: float):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.metrics, self.t0, self.first = metrics, t0, True

    def _seen(self, text: str) -> None:  # the first token's event ("" when it shows no text yet)
        if self.first:
            self.first = False
            self.metrics.ttft.observe(time.perf_counter() - self.t0)

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def chunk(self, delta: dict[str, Any], finish: str | None = None, usage: bool = False) -> str:
        body: dict[str, Any] = {**self.head(), "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                            "finish_reason": finish}]}
        if usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    async def collect(self, job: Job, first: tuple[str, Any]) -> dict[str, Any]:
        text, (kind, payload) = [], first
        while kind == "delta":
            self._seen(payload)
            text.append(payload)
            kind, payload = await job.next()
        usage, finish = payload
        self.metrics.output_tokens.inc(usage["completion_tokens"])
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None, "finish_reason": finish}], "usage": usage}

    async def stream(self, job: Job, first: tuple[str, Any], include_usage: bool) -> AsyncIterator[str]:
        """role chunk, delta chunks, the finish chunk, the usage chunk (stream_options.include_usage),
        [DONE]. An error after the first byte is sent as an error event (the status is already 200)."""
        try:
            yield self.chunk({"role": "assistant", "content": ""}, usage=include_usage)
            kind, payload = first
            try:
                while kind == "delta":
                    self._seen(payload)
                    yield self.chunk({"content": payload}, usage=include_usage)
                    kind, payload = await job.next()
            except ServeError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            usage, finish = payload
            self.metrics.output_tokens.inc(usage["completion_tokens"])
            yield self.chunk({}, finish, usage=include_usage)
            if include_usage:
                yield f"data: {json.dumps({**self.head(), 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also on a client disconnect (the response task is cancelled): free the engine
            job.cancelled.set()
