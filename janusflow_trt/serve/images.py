"""POST /v1/images/generations: an OpenAI image request -> the engine thread -> base64 PNGs, or server-sent
events (`stream: true`): `partial_images` previews, then one `image_generation.completed` per image.
The extension fields seed, guidance_scale and num_inference_steps are the CLI's --seed, --cfg and --steps
(and default as they do).

A partial image is a preview of the clean latent the flow predicts at that step. Rectified flow runs
t = i / steps from noise (0) to the image (1) with z_{i+1} = z_i + dt * v_i, so the clean latent
predicted at step i is x0 = z_i + (1 - t_i) * v_i = z_i + (steps - i) * (z_{i+1} - z_i): the step's
own update (CFG included, as gen_dec applied it) carried on to t = 1. It is rendered without the VAE,
by a linear map of the 4 SDXL latent channels to RGB, upsampled 8x (`preview_rgb`).
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from janusflow_trt.api import GenerateResult, Pipeline
from janusflow_trt.image_batch import ImageRequest, predicted_x0
from janusflow_trt.images import to_uint8

from .engine import Job, TokenTap
from .metrics import Metrics
from .protocol import ImageGenerationRequest, ServeError

SIZE = "384x384"  # the VAE's output: the one size this model draws
DEFAULTS = {"seed": 12345, "guidance_scale": 2.0, "num_inference_steps": 30}  # the CLI's generate defaults
# SDXL latent (the scaled latent the Euler loop carries) -> RGB in [-1, 1]: the least-squares linear fit
# of the SDXL VAE's output that ComfyUI publishes for its latent previews (comfy/latent_formats.py, SDXL)
LATENT_RGB = torch.tensor([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
                           [-0.3165, -0.2492, -0.2188]])  # [4 latent channels, 3]
LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])
VAE_UPSCALE = 8  # 48x48 latents -> 384x384 pixels


@dataclass
class ImageCall:
    prompt: str
    n: int
    steps: int
    cfg_weight: float
    seed: int
    stream: bool = False
    partials: int = 0  # partial images per image (stream only)


def image_call(req: ImageGenerationRequest, max_images: int) -> ImageCall:
    """max_images: the graphs' batch limit (export.specs.max_images)."""
    if req.size not in (None, "auto", SIZE):
        raise ServeError(400, f"size {req.size!r} is not supported; this model draws {SIZE} only", param="size")
    if req.response_format not in (None, "b64_json"):
        raise ServeError(400, f"response_format {req.response_format!r} is not supported; use b64_json (the server "
                              "keeps no images to link to)", param="response_format")
    if req.output_format not in (None, "png"):
        raise ServeError(400, f"output_format {req.output_format!r} is not supported; use png", param="output_format")
    if req.n > max_images:
        raise ServeError(400, f"n={req.n} is over the exported graphs' batch limit of {max_images} images",
                         param="n")
    if not req.prompt.strip():
        raise ServeError(400, "prompt is empty", param="prompt")
    pick = lambda k: DEFAULTS[k] if getattr(req, k) is None else getattr(req, k)
    return ImageCall(prompt=req.prompt, n=req.n, steps=pick("num_inference_steps"),
                     cfg_weight=float(pick("guidance_scale")), seed=pick("seed"), stream=req.stream,
                     partials=(req.partial_images or 0) if req.stream else 0)


def preview_steps(steps: int, partials: int) -> list[int]:
    """The Euler step indices after which a partial image is sent: `partials` evenly spaced through the
    run, never after the first step (x0 there is the blurred mean of everything) nor the last (that is
    the completed image); fewer when the run is too short (OpenAI: partial_images is an upper bound)."""
    at = {math.floor(k * steps / (partials + 1)) for k in range(1, partials + 1)}
    return sorted(i for i in at if 1 <= i <= steps - 2)


def usage(pipe: Pipeline, call: ImageCall, ids: list[int]) -> dict[str, Any]:
    """The OpenAI usage object: the prompt's tokens in (`ids`: the generation prompt), the image tokens
    (576 per image) out."""
    text, out = len(ids), call.n * pipe.cfg.num_gen_tokens
    return {"input_tokens": text, "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
            "output_tokens": out, "total_tokens": text + out}


def image_work(call: ImageCall):
    """The job's work on the engine thread, one request alone: posts ("start", usage) once the request is
    checked and its first Euler step done, ("partial", (k, x0 [n,4,48,48])) at the preview steps, then
    ("done", GenerateResult). The step callback is the job's cancellation point (a client that left
    frees the engine at the next Euler step)."""
    previews = preview_steps(call.steps, call.partials)

    def work(pipe: Pipeline, tap: TokenTap, job: Job) -> None:
        # refuses bad input (a prompt beyond the context) before any work
        use = usage(pipe, call, pipe.generate_request(call.prompt, call.n, call.steps, call.cfg_weight, call.seed))
        before: list[torch.Tensor] = []  # z before a preview step (the callback's z is the loop's buffer)

        def step(i: int, z: np.ndarray) -> None:
            job.check()
            if i == 0:
                job.post("start", use)
            if i in previews:
                x0 = predicted_x0(before[0], torch.from_numpy(z), i, call.steps)
                job.post("partial", (previews.index(i), x0.numpy()))
            if i + 1 in previews:
                before[:] = [torch.from_numpy(z.copy())]

        res = pipe.generate(call.prompt, num_images=call.n, steps=call.steps, cfg_weight=call.cfg_weight,
                            seed=call.seed, callback=step)
        job.post("done", res)

    return work


class BatchedImage:
    """An image job run by the engine's Euler-step scheduler (--max-batch > 1): its ImageRequest, checked
    as Pipeline.generate checks it, and the scheduler's events posted as image_work posts them."""

    def __init__(self, pipe: Pipeline, call: ImageCall, job: Job):
        ids = pipe.generate_request(call.prompt, call.n, call.steps, call.cfg_weight, call.seed)
        self.req = ImageRequest(ids, call.n, call.steps, call.cfg_weight, call.seed,
                                previews=preview_steps(call.steps, call.partials))
        self.job, self.use = job, usage(pipe, call, ids)

    def event(self, kind: str, payload: Any) -> None:
        self.job.post(kind, self.use if kind == "start" else payload)


def batched_image(call: ImageCall):
    def start(pipe: Pipeline, job: Job) -> BatchedImage:
        return BatchedImage(pipe, call, job)

    return start


def preview_rgb(x0: np.ndarray) -> np.ndarray:
    """x0 [n, 4, 48, 48] -> [n, 384, 384, 3] uint8: the linear latent-to-RGB map, bilinear 8x upsampling."""
    rgb = torch.einsum("nchw,cr->nrhw", torch.from_numpy(x0).float(), LATENT_RGB) + LATENT_RGB_BIAS.view(1, 3, 1, 1)
    return to_uint8(F.interpolate(rgb, scale_factor=VAE_UPSCALE, mode="bilinear", align_corners=False))


def preview_pngs(x0: np.ndarray) -> list[str]:
    return [png(a) for a in preview_rgb(x0)]


def png(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_b64(res: GenerateResult) -> list[str]:
    return [png(np.asarray(im)) for im in res.images]


def images_response(pngs: list[str], use: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {"created": int(time.time()), "data": [{"b64_json": b} for b in pngs], "output_format": "png",
           "size": SIZE}
    if use is not None:
        out["usage"] = use
    return out


def event(kind: str, b64: str, image: int, **fields: Any) -> str:
    """One server-sent event in OpenAI's image stream schema (`image_index`: ours, which of n images)."""
    body = {"type": f"image_generation.{kind}", "b64_json": b64, "created_at": int(time.time()), "size": SIZE,
            "quality": "auto", "background": "opaque", "output_format": "png", "image_index": image, **fields}
    return f"event: {body['type']}\ndata: {json.dumps(body)}\n\n"


async def image_events(job: Job, use: dict[str, Any], metrics: Metrics, render) -> AsyncIterator[str]:
    """The stream after the job's start: each preview step's partial image for every image of the request
    (partial_image_index k, image_index i), then each image's completed event with the request's usage.
    An error after the first byte is an error event (the status is already 200). render(fn, *args): runs
    fn off the event loop (PNG encoding)."""
    try:
        while True:
            try:
                kind, payload = await job.next()
            except ServeError as e:
                yield f"event: error\ndata: {json.dumps(e.body())}\n\n"
                return
            if kind == "partial":
                k, x0 = payload
                for i, b in enumerate(await render(preview_pngs, x0)):
                    yield event("partial_image", b, i, partial_image_index=k)
                continue
            metrics.images.inc(len(payload.images))
            for i, b in enumerate(await render(png_b64, payload)):
                yield event("completed", b, i, usage=use)
            return
    finally:  # also on a client disconnect (the response task is cancelled): free the engine
        job.cancelled.set()


async def collect(job: Job) -> GenerateResult:
    """A plain (not streamed) request's result; partial images are not asked for, so none come."""
    while True:
        kind, payload = await job.next()
        if kind == "done":
            return payload
