"""The Python API: load once, call many times.

    pipe = Pipeline.from_pretrained("JanusFlow-1.3B", backend="ort", artifacts="jf-onnx")
    pipe.chat("cat.png", "What is in the picture?").text
    pipe.generate("a red fox", num_images=2, seed=7).images[0].save("fox.png")

Weights, tokenizer, ONNX Runtime sessions and preallocated buffers belong to the Pipeline and are
reused by every call; a call loads nothing (the VAE and each graph's session are opened on their
first use, once).

Threads: a Pipeline may be shared. Its calls are serialised by one lock (they share one KV cache, the
backend's buffers and torch's global RNG, which the official sampling draws from): a call from a second
thread waits for the running one, and its result equals the same call made alone. A chat_stream holds
the lock from its first piece to its last (or until it is closed or garbage-collected), so a stream
left half-read blocks the other threads; a call made from the thread that holds it (inside its own
stream's loop, or from a callback) is refused with JanusFlowError instead of deadlocking. The lock
does not cover torch's global RNG against code outside the Pipeline that draws from it meanwhile.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from janusflow_trt.errors import InputError, JanusFlowError
from janusflow_trt.export.specs import build_specs, max_images
from janusflow_trt.images import to_uint8
from janusflow_trt.janusflow_ref.config import JanusFlowConfig, load_config
from janusflow_trt.janusflow_ref.generation import check_generation_args, initial_latents, prompt_ids
from janusflow_trt.janusflow_ref.processor import SYSTEM_PROMPT, ChatInputs, Processor, load_image
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.janusflow_ref.understanding import ChatResult, check_context
from janusflow_trt.latents_io import check_finite_latents
from janusflow_trt.runtime.argtypes import MAX_THREADS
from janusflow_trt.runtime.detok import IncrementalDecoder

from . import validation as V
from .engines import build_engine
from .runtime.registry import check_request

ImageLike = Image.Image | np.ndarray | str | Path


@dataclass
class GenerateResult:
    images: list[Image.Image]
    latents: np.ndarray  # [n, 4, 48, 48] float32, the final Euler state
    timings: dict[str, float] = field(default_factory=dict)


def final_images(latents: np.ndarray, steps: int, vae: Callable[[torch.Tensor], torch.Tensor]) -> list[Image.Image]:
    """A generation's final latents [n, 4, 48, 48] -> its images through `vae`, refusing non-finite latents
    or pixels in one line each (Pipeline.generate and the server's batched images: one check)."""
    check_finite_latents(latents, None, steps)
    decoded = vae(torch.from_numpy(latents)).float().cpu().numpy()
    if not np.isfinite(decoded).all():
        raise InputError("the VAE decoder produced non-finite pixels (NaN or Inf); check the VAE weights")
    return [Image.fromarray(a) for a in to_uint8(decoded)]


def as_image(image: ImageLike) -> Image.Image:
    """A PIL image, an HxWx3 uint8 array or a path -> RGB PIL image."""
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise InputError(f"image is {image.size[0]}x{image.size[1]}: empty")
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4) or 0 in image.shape[:2]:
            raise InputError(f"image array must be HxWx3 (or 4) uint8 and not empty, got {image.dtype} "
                             f"{image.shape}")
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, str | Path):
        return load_image(image)
    raise InputError(f"image must be a PIL image, a numpy array or a path, got {type(image).__name__}")


class Pipeline:
    def __init__(self, cfg: JanusFlowConfig, processor: Processor, engine, backend: str):
        self.cfg, self.processor, self.engine, self.backend = cfg, processor, engine, backend
        self._lock = threading.Lock()
        self._special = processor.special_tokens  # refused in user text by validation
        self._owner: int | None = None  # the thread holding _lock

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One call at a time (see the module docstring); a nested call from the holding thread is refused."""
        me = threading.get_ident()
        if self._owner == me:
            raise JanusFlowError("this Pipeline is already running a call in this thread (a chat_stream not "
                                 "finished, or a call from a generate callback); finish or close it first")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, backend: str = "ort", artifacts: str | Path | None = None,
                        vae: str | Path | None = None, precision: str = "fp32", threads: int | None = None) -> Pipeline:
        """model_dir: checkpoint in the official layout (config, tokenizer; weights for torch / torch-fast).
        backend: a name of runtime/registry.py's BACKENDS: torch (official-style eager reference) |
        torch-fast | ort | trt | torch-cuda (GPU). artifacts: export directory (ort, trt). vae: SDXL-VAE
        directory (torch backends; default MODEL/vae). threads: intra-op threads (default: physical cores)."""
        for name, v in (("backend", backend), ("precision", precision)):
            if not isinstance(v, str):
                raise InputError(f"{name} must be a string, got {type(v).__name__}")
        for name, path in (("model_dir", model_dir), ("artifacts", artifacts), ("vae", vae)):
            if path is not None and not isinstance(path, str | Path):
                raise InputError(f"{name} must be a path, got {type(path).__name__}")
        check_request(backend, precision, artifacts)
        V.threads(threads, MAX_THREADS)
        model_dir = Path(model_dir)
        cfg = load_config(model_dir)
        processor = Processor(model_dir)
        engine = build_engine(backend, model_dir, cfg, processor, Path(artifacts) if artifacts else None,
                              Path(vae) if vae else None, threads, precision)
        return cls(cfg, processor, engine, backend)

    # -- understanding ---------------------------------------------------------------------------
    def chat_request(self, image, question, max_new_tokens, temperature, top_p, seed, system_prompt
                     ) -> tuple[ChatInputs, SamplingParams]:
        """The arguments of chat / chat_stream checked and turned into the runtime's inputs (the
        scheduler of janusflow_trt/batch.py takes the same)."""
        V.chat_args(max_new_tokens, temperature, top_p, seed)
        V.text("the question", question, self._special)
        V.text("system_prompt", system_prompt, self._special)
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        if not question.strip():
            raise InputError("the question is empty")
        inputs = self.processor.chat_inputs(as_image(image), question, system_prompt)
        check_context(inputs.input_ids.shape[1], params.max_new_tokens, self.cfg.max_context)
        return inputs, params

    def chat_stream(self, image: ImageLike, question: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 42, system_prompt: str = SYSTEM_PROMPT) -> Iterator[str]:
        """Text pieces as the answer is sampled; joined, they equal chat(...).text. Bad input raises
        before the first piece."""
        inputs, params = self.chat_request(image, question, max_new_tokens, temperature, top_p, seed, system_prompt)
        return self._stream(inputs, params, seed)

    def _stream(self, inputs, params, seed) -> Iterator[str]:
        detok = self.detokenizer()
        with self._exclusive():  # held across the yields: the stream owns the KV cache until it ends
            torch.manual_seed(seed)  # sampling draws from torch's global RNG, as the official demo
            for t in self.engine.chat_tokens(inputs, params):
                piece = detok.put(t)
                if piece:
                    yield piece
        rest = detok.end()
        if rest:
            yield rest

    def detokenizer(self) -> IncrementalDecoder:
        """Answer ids -> text pieces, as chat_stream yields them."""
        tok = self.processor.tokenizer
        return IncrementalDecoder(lambda ids: tok.decode(ids, skip_special_tokens=True), self.processor.clean_up_spaces)

    def chat(self, image: ImageLike, question: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 42, system_prompt: str = SYSTEM_PROMPT) -> ChatResult:
        """-> text, token_ids, prompt_tokens, timings (ttft_s, total_s, decode_ms_per_token)."""
        inputs, params = self.chat_request(image, question, max_new_tokens, temperature, top_p, seed, system_prompt)
        ids: list[int] = []
        with self._exclusive():
            t0 = time.perf_counter()  # a call that waited for the lock times its own work
            torch.manual_seed(seed)
            t_first = t0
            for t in self.engine.chat_tokens(inputs, params):
                if not ids:
                    t_first = time.perf_counter()
                ids.append(t)
        t_end = time.perf_counter()
        timings = {"ttft_s": t_first - t0, "total_s": t_end - t0,
                   "decode_ms_per_token": (t_end - t_first) / max(len(ids) - 1, 1) * 1e3}
        return ChatResult(text=self.processor.decode(ids), token_ids=ids, prompt_tokens=inputs.input_ids.shape[1],
                          timings=timings)

    # -- generation ------------------------------------------------------------------------------
    def generate_request(self, prompt: str, num_images: int, steps: int, cfg_weight: float, seed: int) -> list[int]:
        """The arguments of generate checked (the scheduler of janusflow_trt/image_batch.py takes the
        same) -> the generation prompt's ids; a prompt beyond the context is refused before any work."""
        # the graphs' batch limits (CFG rows = 2 x images; the VAE decodes images), for every backend:
        # they also bound the eager reference's memory
        V.generate_args(num_images, steps, cfg_weight, seed, None)
        V.text("the prompt", prompt, self._special)
        check_generation_args(steps, cfg_weight, num_images, max_images(build_specs(self.cfg)))
        return prompt_ids(self.processor, prompt, self.cfg)

    def generate(self, prompt: str, *, num_images: int = 1, steps: int = 30, cfg_weight: float = 2.0,
                 seed: int = 12345, init_latents: np.ndarray | None = None,
                 callback: Callable[[int, np.ndarray], None] | None = None) -> GenerateResult:
        """-> PIL images, final latents, timings. init_latents [n,4,48,48] replaces the seeded noise;
        callback(step, z) runs after each Euler step (z: [n,4,48,48], valid during the call)."""
        V.callback(callback)
        if init_latents is not None and not isinstance(init_latents, np.ndarray):
            raise InputError(f"init_latents must be a numpy array or None, got {type(init_latents).__name__}")
        self.generate_request(prompt, num_images, steps, cfg_weight, seed)
        with self._exclusive():
            z0 = initial_latents(num_images, seed, init_latents)
            self.engine.ensure_vae()  # the first generate loads the VAE, before any step
            t0 = time.perf_counter()
            prefix = self.engine.prefix(prompt, num_images)
            t1 = time.perf_counter()
            z = z0
            # z stays on the backend's device: it is read back only for a callback (which then also checks
            # it) and once at the end. A NaN or Inf never turns finite again in later steps (z + dt * v), so
            # the end check catches any step's; the callback's check names the step where it appeared.
            for i, z in enumerate(self.engine.euler(prefix, z0, steps, cfg_weight)):
                if callback is not None:
                    host = z.cpu().numpy()
                    check_finite_latents(host, i, steps)
                    callback(i, host)
            latents = z.to("cpu", torch.float32, copy=True).numpy()  # a copy: z is the loop's carry buffer
            t2 = time.perf_counter()
            images = final_images(latents, steps, self.engine.vae)
            t3 = time.perf_counter()
        timings = {"prefix_s": t1 - t0, "euler_s": t2 - t1, "euler_ms_per_step": (t2 - t1) / steps * 1e3,
                   "vae_s": t3 - t2, "total_s": t3 - t0}
        return GenerateResult(images=images, latents=latents, timings=timings)
