"""A client of a generated repository over tritonclient (gRPC or HTTP): what `janusflow chat|generate
--triton URL` runs, and what the tests call.

URL: grpc://HOST:PORT or http://HOST:PORT. janusflow_chat is decoupled (one response per token): over gRPC
it is a stream (start_stream / async_stream_infer); over HTTP, Triton's infer endpoint refuses decoupled
models, so the chat goes through its generate extension (POST /v2/models/janusflow_chat/generate_stream,
server-sent events; JSON, hence the image as `image_base64`). janusflow_t2i is a plain infer over either.
"""

from __future__ import annotations

import base64
import json
import queue
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from janusflow_trt.errors import InputError, JanusFlowError
from janusflow_trt.images import output_paths, save_images
from janusflow_trt.latents_io import npy_writer

from .repo import CHAT, T2I


@dataclass(frozen=True)
class Target:
    protocol: str  # "grpc" | "http"
    address: str  # HOST:PORT

    @property
    def lib(self) -> Any:
        return grpcclient if self.protocol == "grpc" else httpclient


def parse_url(url: str) -> Target:
    for scheme in ("grpc", "http"):
        if url.startswith(f"{scheme}://"):
            address = url[len(scheme) + 3:].rstrip("/")
            if address and ":" in address:
                return Target(scheme, address)
    raise InputError(f"--triton {url!r}: expected grpc://HOST:PORT or http://HOST:PORT")


def _client(t: Target) -> Any:
    return t.lib.InferenceServerClient(t.address)


def _input(t: Target, name: str, value: np.ndarray) -> Any:
    dtype = "BYTES" if value.dtype == np.object_ else {np.dtype("int32"): "INT32", np.dtype("int64"): "INT64",
                                                         np.dtype("float32"): "FP32"}[value.dtype]
    x = t.lib.InferInput(name, list(value.shape), dtype)
    x.set_data_from_numpy(value)
    return x


def _chat_inputs(t: Target, image: bytes, question: str, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list:
    return [_input(t, "image", np.array([image], dtype=np.object_)),
            _input(t, "question", np.array([question.encode()], dtype=np.object_)),
            _input(t, "max_new_tokens", np.array([max_new_tokens], np.int32)),
            _input(t, "temperature", np.array([temperature], np.float32)),
            _input(t, "top_p", np.array([top_p], np.float32)), _input(t, "seed", np.array([seed], np.int64))]


def _one_line(e: InferenceServerException) -> JanusFlowError:
    msg = (e.message() or str(e)).strip().splitlines()
    return JanusFlowError(f"triton: {msg[0] if msg else type(e).__name__}")


def _check_live(c: Any, url: str) -> None:
    try:
        live = c.is_server_live()
    except InferenceServerException as e:
        raise JanusFlowError(f"triton: cannot reach {url}: {(e.message() or str(e)).splitlines()[0]}") from None
    except OSError as e:  # the HTTP client's socket errors (a refused connection)
        raise JanusFlowError(f"triton: cannot reach {url}: {e.strerror or e}") from None
    if not live:
        raise JanusFlowError(f"triton: the server at {url} is not live")


def _piece(result: Any) -> tuple[list[int], str]:
    return ([int(i) for i in result.as_numpy("token_ids").reshape(-1)],
            result.as_numpy("text").reshape(-1)[0].decode("utf-8"))


def chat_stream(url: str, image: bytes, question: str, max_new_tokens: int = 512, temperature: float = 0.0,
                top_p: float = 1.0, seed: int = 42, timeout_s: float = 600.0) -> Iterator[tuple[list[int], str]]:
    """(token ids, text piece) per response of janusflow_chat, as they arrive."""
    t = parse_url(url)
    inputs = _chat_inputs(t, image, question, max_new_tokens, temperature, top_p, seed)
    try:
        if t.protocol == "http":
            yield from _sse_chat(t, image, question, max_new_tokens, temperature, top_p, seed, timeout_s)
            return
        got: queue.Queue = queue.Queue()
        c = _client(t)
        try:
            _check_live(c, url)  # else a refused connection surfaces only as "the stream is no longer valid"
            c.start_stream(callback=lambda result, error: got.put((result, error)))
            try:
                c.async_stream_infer(CHAT, inputs, enable_empty_final_response=True)
                while True:
                    result, error = got.get(timeout=timeout_s)
                    if error is not None:
                        raise error
                    final = result.get_response().parameters["triton_final_response"].bool_param
                    if result.get_response().outputs:
                        yield _piece(result)
                    if final:
                        return
            finally:
                c.stop_stream()
        finally:
            c.close()
    except InferenceServerException as e:
        raise _one_line(e) from None
    except queue.Empty:
        raise JanusFlowError(f"triton: no response from {CHAT} in {timeout_s:g} s") from None


def _sse_chat(t: Target, image: bytes, question: str, max_new_tokens: int, temperature: float, top_p: float,
              seed: int, timeout_s: float) -> Iterator[tuple[list[int], str]]:
    body = {"image_base64": base64.b64encode(image).decode(), "question": question,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    url = f"http://{t.address}/v2/models/{CHAT}/generate_stream"
    try:
        with httpx.stream("POST", url, json=body, timeout=timeout_s) as r:
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise JanusFlowError(f"triton: {str(event['error']).splitlines()[0]}")
                ids = event.get("token_ids", [])
                yield [int(i) for i in (ids if isinstance(ids, list) else [ids])], str(event.get("text", ""))
    except httpx.ConnectError as e:
        raise JanusFlowError(f"triton: cannot reach http://{t.address}: {e}") from None
    except httpx.HTTPError as e:
        raise JanusFlowError(f"triton: {url}: {e}") from None


def generate(url: str, prompt: str, num_images: int = 1, steps: int = 30, cfg_weight: float = 2.0, seed: int = 12345,
             init_latents: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> images [n, H, W, 3] uint8, final latents [n, 4, 48, 48] float32 from janusflow_t2i."""
    t = parse_url(url)
    inputs = [_input(t, "prompt", np.array([prompt.encode()], dtype=np.object_)),
              _input(t, "num_images", np.array([num_images], np.int32)),
              _input(t, "steps", np.array([steps], np.int32)),
              _input(t, "cfg_weight", np.array([cfg_weight], np.float32)),
              _input(t, "seed", np.array([seed], np.int64))]
    if init_latents is not None:
        inputs.append(_input(t, "init_latents", np.ascontiguousarray(init_latents, np.float32)))
    try:
        c = _client(t)
        try:
            _check_live(c, url)
            r = c.infer(T2I, inputs)
        finally:
            c.close()
    except InferenceServerException as e:
        raise _one_line(e) from None
    return r.as_numpy("images"), r.as_numpy("latents")


# -- the CLI's --triton path (janusflow chat / generate) ---------------------------------------------------
def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None


def cli_chat(args: Any) -> int:
    parse_url(args.triton)
    image = _read(args.image, "--image")
    ids: list[int] = []
    text = []
    for piece_ids, piece in chat_stream(args.triton, image, args.question, args.max_new_tokens, args.temperature,
                                        args.top_p, args.seed):
        ids += piece_ids
        text.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": ids, "triton": args.triton, "seed": args.seed}))
    else:
        sys.stdout.write("\n")
    return 0


def cli_generate(args: Any, init: np.ndarray | None) -> int:
    """After the CLI checked the outputs and read --init-latents: the run on the server, then the same
    atomic writes as the in-process path (images and latents renamed into place together)."""
    parse_url(args.triton)
    images, latents = generate(args.triton, args.prompt, args.num_images, args.steps, args.cfg, args.seed, init)
    extra = [(args.save_latents, npy_writer(latents))] if args.save_latents else []
    paths = save_images(images, output_paths(args.out, len(images)), extra=extra)[:len(images)]
    if args.json:
        print(json.dumps({"images": [str(p) for p in paths], "seed": args.seed, "triton": args.triton,
                          "latents": args.save_latents}))
    else:
        for p in paths:
            print(f"wrote {p}")
    return 0
