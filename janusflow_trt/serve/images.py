"""POST /v1/images/generations: an OpenAI image request -> one Pipeline.generate call on the engine
thread -> base64 PNGs. The extension fields seed, guidance_scale and num_inference_steps are the CLI's
--seed, --cfg and --steps (and default as they do)."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from typing import Any

from janusflow_trt.api import GenerateResult, Pipeline

from .engine import Job, TokenTap
from .protocol import ImageGenerationRequest, ServeError

SIZE = "384x384"  # the VAE's output: the one size this model draws
DEFAULTS = {"seed": 12345, "guidance_scale": 2.0, "num_inference_steps": 30}  # the CLI's generate defaults


@dataclass
class ImageCall:
    prompt: str
    n: int
    steps: int
    cfg_weight: float
    seed: int


def image_call(req: ImageGenerationRequest, max_images: int) -> ImageCall:
    """max_images: the graphs' batch limit (export.specs.max_images)."""
    if req.size not in (None, "auto", SIZE):
        raise ServeError(400, f"size {req.size!r} is not supported; this model draws {SIZE} only", param="size")
    if req.response_format not in (None, "b64_json"):
        raise ServeError(400, f"response_format {req.response_format!r} is not supported; use b64_json (the server "
                              "keeps no images to link to)", param="response_format")
    if req.output_format not in (None, "png"):
        raise ServeError(400, f"output_format {req.output_format!r} is not supported; use png", param="output_format")
    if req.stream or req.partial_images:
        raise ServeError(400, "streamed images (stream, partial_images) are not supported yet", param="stream")
    if req.n > max_images:
        raise ServeError(400, f"n={req.n} is over the exported graphs' batch limit of {max_images} images",
                         param="n")
    if not req.prompt.strip():
        raise ServeError(400, "prompt is empty", param="prompt")
    pick = lambda k: DEFAULTS[k] if getattr(req, k) is None else getattr(req, k)
    return ImageCall(prompt=req.prompt, n=req.n, steps=pick("num_inference_steps"),
                     cfg_weight=float(pick("guidance_scale")), seed=pick("seed"))


def image_work(call: ImageCall):
    """The job's work on the engine thread: posts ("done", GenerateResult). The step callback is the
    job's cancellation point (a client that left frees the engine at the next Euler step)."""

    def work(pipe: Pipeline, tap: TokenTap, job: Job) -> None:
        res = pipe.generate(call.prompt, num_images=call.n, steps=call.steps, cfg_weight=call.cfg_weight,
                            seed=call.seed, callback=lambda step, z: job.check())
        job.post("done", res)

    return work


def png_b64(res: GenerateResult) -> list[str]:
    out = []
    for im in res.images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def images_response(pngs: list[str]) -> dict[str, Any]:
    return {"created": int(time.time()), "data": [{"b64_json": b} for b in pngs], "output_format": "png",
            "size": SIZE}
