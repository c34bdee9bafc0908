"""The FastAPI app: OpenAI routes over one EngineLoop, bearer auth, a body limit, metrics, and one
error shape ({"error": {message, type, param, code}}) for every refusal, with no traceback ever sent.

Routes parse their own bodies (protocol.parse) so that bad JSON, a wrong type and an oversized body
each get their own clear 4xx rather than FastAPI's default 422 shape."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from janusflow_trt.api import Pipeline
from janusflow_trt.errors import JanusFlowError
from janusflow_trt.export.specs import build_specs, max_images

from .chat import Reply, batched_chat, chat_call, chat_work
from .engine import EngineLoop, Job
from .images import batched_image, collect, image_call, image_events, image_work, images_response, png_b64
from .metrics import Metrics
from .protocol import ChatCompletionRequest, ImageGenerationRequest, ServeError, parse

log = logging.getLogger("janusflow.serve")
ENDPOINTS = ("/v1/chat/completions", "/v1/images/generations", "/v1/models", "/health", "/ready", "/metrics")


@dataclass(frozen=True)
class Settings:
    model_name: str
    api_key: str | None = None
    max_queue: int = 64
    max_body_bytes: int = 32 * 2**20  # a base64 image of a few tens of megapixels
    request_timeout_s: float = 600.0
    max_batch: int = 1  # chat answers decoded together (engine.py); 1: one job at a time
    image_step_images: int | None = None  # images per Euler step call (engine.py; None: as many as fit)


def error_response(e: ServeError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Observe:
    """ASGI middleware: requests by endpoint and status, latency to the last byte (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
        t0, status = time.perf_counter(), [500]

        async def observed(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()


def create_app(pipe: Pipeline, settings: Settings) -> FastAPI:
    """pipe: loaded once, before the app serves (the engine thread owns it from here on)."""
    metrics = Metrics()
    engine = EngineLoop(pipe, settings.max_queue, metrics, settings.max_batch, settings.image_step_images)
    limit_images = max_images(build_specs(pipe.cfg))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="janusflow", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(Observe, metrics=metrics)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        return error_response(e)

    @app.exception_handler(JanusFlowError)
    async def refused(request: Request, e: JanusFlowError):  # the pipeline's one-line refusal of bad input
        return error_response(ServeError(400, str(e), code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown route, wrong method
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(ServeError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                         code=code, headers=dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # logged by the server, one line to the client
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(ServeError(500, "internal server error", type="server_error"))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                    settings.api_key.encode()):
            raise ServeError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                             type="authentication_error", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})

    async def body(request: Request) -> bytes:
        """The raw body, refused with 413 past the limit (by its Content-Length, or while reading it)."""
        too_big = ServeError(413, f"the request body is over the limit of {settings.max_body_bytes} bytes",
                             code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise ServeError(404, f"model {name!r} does not exist; this server serves {settings.model_name!r}",
                             param="model", code="model_not_found")

    def job(endpoint: str, work, batched=None, image_rows=None) -> Job:
        j = Job(endpoint, work, asyncio.get_running_loop(), time.monotonic() + settings.request_timeout_s,
                batched=batched, image_rows=image_rows)
        engine.submit(j)
        return j

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        authorize(request)
        req = parse(ChatCompletionRequest, await body(request))
        check_model(req.model)
        call = await run_in_threadpool(chat_call, req)  # decodes the image off the event loop
        j = job("chat", chat_work(call), batched_chat(call))
        first = await j.next()  # errors before the first piece (bad input) are plain 4xx responses
        reply = Reply(settings.model_name, metrics, t0)
        if not req.stream:
            return await reply.collect(j, first)
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(reply.stream(j, first, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        t0 = time.perf_counter()
        authorize(request)
        req = parse(ImageGenerationRequest, await body(request))
        check_model(req.model)
        call = image_call(req, limit_images)
        j = job("images", image_work(call), image_rows=batched_image(call))
        _, use = await j.next()  # ("start", usage): errors before it (bad input) are plain 4xx responses
        metrics.first_step.observe(time.perf_counter() - t0)
        if call.stream:
            return StreamingResponse(image_events(j, use, metrics, run_in_threadpool),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        res = await collect(j)
        metrics.images.inc(len(res.images))
        return images_response(await run_in_threadpool(png_b64, res), use)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "janusflow-trt"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not engine.alive:
            raise ServeError(503, "the engine thread is not running", type="server_error", code="not_ready")
        return {"status": "ready", "model": settings.model_name}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
