"""What `janusflow chat` / `generate` run: the official-style reference (`torch`) or our runtime
pipelines over a backend (`torch-fast`, `ort`, `trt`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from janusflow_ref.config import load_config
from janusflow_ref.errors import InputError
from janusflow_ref.images import output_paths, save_png, to_uint8, write_atomic
from janusflow_ref.processor import Processor

from .backends import make_backend, physical_cores


def chat_session(args, cfg, processor: Processor, image, params, on_token=None):
    if args.backend == "torch":
        from janusflow_ref.understanding import chat
        from janusflow_ref.weights import load_model

        torch.set_num_threads(args.threads or physical_cores())
        model = load_model(args.model)
        t0 = time.perf_counter()
        res = chat(model, processor, image, args.question, params, args.seed, on_token=on_token)
        res.timings = {"total_s": time.perf_counter() - t0}
        return res
    from .chat import chat

    backend = make_backend(args.backend, args.model, args.artifacts, cfg, args.threads, precision=args.precision)
    return chat(backend, cfg, processor, image, args.question, params, args.seed, on_token=on_token)


@dataclass
class GenerateResult:
    paths: list[Path]
    latents: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def generate_session(args, init: np.ndarray | None, progress: bool = True) -> GenerateResult:
    from janusflow_ref.generation import initial_latents

    cfg = load_config(args.model)
    processor = Processor(args.model)
    if not args.prompt.strip():
        raise InputError("--prompt is empty")
    z0 = initial_latents(args.num_images, args.seed, init)
    t0 = time.perf_counter()
    if args.backend == "torch":
        from janusflow_ref import generation as ref
        from janusflow_ref.vae import load_vae, resolve_vae_dir
        from janusflow_ref.weights import load_model

        torch.set_num_threads(args.threads or physical_cores())
        vae = load_vae(resolve_vae_dir(args.model, args.vae))
        model = load_model(args.model)
        prefix, mask = ref.prompt_prefix(model, processor, args.prompt, args.num_images)
        bar = tqdm(total=args.steps, desc="euler", unit="step", disable=not progress)
        t1 = time.perf_counter()
        z = z0
        for z in ref.euler_steps(model, prefix, mask, z0, args.steps, args.cfg):
            bar.update(1)
        t2 = time.perf_counter()
        decoded = ref.vae_decode(vae, z)
        z = z.numpy()
    else:
        from . import text2img

        backend = make_backend(args.backend, args.model, args.artifacts, cfg, args.threads, need_vae=True,
                               vae_dir=args.vae, precision=args.precision)
        cache = text2img.prefill_prefix(backend, cfg, processor, args.prompt, args.num_images)
        bar = tqdm(total=args.steps, desc="euler", unit="step", disable=not progress)
        t1 = time.perf_counter()
        z = z0.numpy()
        for z in text2img.euler_loop(backend, cache, z0.numpy(), args.steps, args.cfg):
            bar.update(1)
        t2 = time.perf_counter()
        decoded = text2img.vae_decode(backend, z)
    bar.close()
    images = to_uint8(decoded)
    t3 = time.perf_counter()
    if args.save_latents:
        _save_npy(args.save_latents, np.asarray(z, np.float32))
    paths = [save_png(img, p) for img, p in zip(images, output_paths(args.out, len(images)), strict=True)]
    timings = {"prefix_s": t1 - t0, "euler_s": t2 - t1, "euler_ms_per_step": (t2 - t1) / args.steps * 1e3,
               "vae_s": t3 - t2, "total_s": t3 - t0}
    return GenerateResult(paths=paths, latents=np.asarray(z), timings=timings)


def _save_npy(path: str | Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to other names
            np.save(f, arr, allow_pickle=False)

    write_atomic(path, write)
