"""The image side of `janusflow serve` on the tiny checkpoint over the tiny ONNX export (ort), spoken to
with the real `openai` client: streamed images (partial previews of the predicted clean latent, then the
completed images) and Euler-step batching across requests, each request's result equal to its own solo
run (and to the CLI's)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image
from test_serve import KEY, _serve

from janusflow_trt import Pipeline
from janusflow_trt.serve.images import LATENT_RGB, LATENT_RGB_BIAS

STEPS = 6


@pytest.fixture(scope="module")
def ref(tiny_dir, tiny_onnx):
    return Pipeline.from_pretrained(tiny_dir, backend="ort", artifacts=tiny_onnx)


@pytest.fixture(scope="module")
def solo(tiny_dir, tiny_onnx):
    yield from _serve(Pipeline.from_pretrained(tiny_dir, backend="ort", artifacts=tiny_onnx))


@pytest.fixture(scope="module")
def batched(tiny_dir, tiny_onnx):
    """--max-batch 4 --image-step-images 4: image requests share Euler steps (janusflow_trt/image_batch.py;
    on the CPU the default is one image per call)."""
    yield from _serve(Pipeline.from_pretrained(tiny_dir, backend="ort", artifacts=tiny_onnx), max_batch=4,
                      image_step_images=4)


def openai_client(server) -> OpenAI:
    return OpenAI(base_url=server[0] + "/v1", api_key=KEY, timeout=60, max_retries=0)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def expected_preview(z_before: np.ndarray, z_after: np.ndarray, step: int) -> np.ndarray:
    """The preview written out from the definitions: t = step / steps, v = (z_after - z_before) / dt,
    x0 = z + (1 - t) v, RGB = the latent map + bias, 8x bilinear, [-1, 1] -> uint8 (truncating)."""
    t, dt = step / STEPS, 1 / STEPS
    x0 = torch.from_numpy(z_before + (1 - t) * (z_after - z_before) / dt)
    rgb = torch.einsum("nchw,cr->nrhw", x0, LATENT_RGB) + LATENT_RGB_BIAS[None, :, None, None]
    rgb = torch.nn.functional.interpolate(rgb, size=(384, 384), mode="bilinear", align_corners=False)
    return ((rgb.clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1) / 2 * 255).astype(np.uint8)


def sample(histogram, suffix: str) -> float:
    return next(s.value for s in histogram.collect()[0].samples if s.name.endswith(suffix))


def near(got: np.ndarray, want: np.ndarray) -> None:
    """Batched latents differ from the solo run's by FP32 summation order (~1e-6, tests/test_image_batch.py);
    after the VAE and the truncating uint8 conversion a pixel may land one level apart."""
    d = np.abs(got.astype(int) - want.astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 1e-3, (d.max(), (d > 0).mean())


@pytest.mark.parametrize("server", ["solo", "batched"])
@pytest.mark.parametrize("n, partials, at", [(1, 2, [2, 4]), (2, 3, [1, 3, 4])])
def test_streamed_images_partials_then_completed(request, server, ref, n, partials, at):
    """partial_images evenly spaced previews (partial_image_index 0..), for each of the n images, then
    each image's completed event: equal to the solo Pipeline's images; previews equal to the definition
    computed from the Pipeline's own latents at those steps."""
    zs: list[np.ndarray] = []
    want = ref.generate("a red fox", num_images=n, steps=STEPS, seed=3, callback=lambda i, z: zs.append(z.copy()))
    events = list(openai_client(request.getfixturevalue(server)).images.generate(
        model="tiny", prompt="a red fox", n=n, size="384x384", stream=True, partial_images=partials,
        extra_body={"seed": 3, "num_inference_steps": STEPS}))
    kinds = [(e.type, getattr(e, "partial_image_index", None), e.image_index) for e in events]
    assert kinds == [("image_generation.partial_image", k, i) for k in range(len(at)) for i in range(n)] + \
        [("image_generation.completed", None, i) for i in range(n)], kinds
    for e in events[:-n]:
        step = at[e.partial_image_index]
        prev = expected_preview(zs[step - 1], zs[step], step)[e.image_index]
        got = decode(e.b64_json)
        assert got.shape == (384, 384, 3)
        assert np.abs(got.astype(int) - prev.astype(int)).max() <= 1, (step, e.image_index)
    for i, e in enumerate(events[-n:]):
        near(decode(e.b64_json), np.asarray(want.images[i]))
        assert e.usage.output_tokens == n * ref.cfg.num_gen_tokens and e.usage.input_tokens > 0


def test_concurrent_image_requests_each_equal_their_solo_run(batched, ref):
    """Requests with different seeds, prompt lengths and n, sent at once (plain and streamed), share the
    Euler steps of one batch; each equals its own solo Pipeline.generate."""
    asks = [("a red fox", 1, 21, False), ("an oil painting of a harbour with many small boats at sunrise", 2, 22, True),
            ("owl", 1, 23, False)]
    client = openai_client(batched)

    def ask(a):
        prompt, n, seed, stream = a
        r = client.images.generate(model="tiny", prompt=prompt, n=n, stream=stream,
                                   extra_body={"seed": seed, "num_inference_steps": 3 * STEPS})
        return [e.b64_json for e in r if e.type == "image_generation.completed"] if stream else \
            [d.b64_json for d in r.data]

    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(ask, asks))
    for (prompt, n, seed, _), pngs in zip(asks, got, strict=True):
        want = ref.generate(prompt, num_images=n, steps=3 * STEPS, seed=seed).images
        assert len(pngs) == n
        for g, w in zip(pngs, want, strict=True):
            near(decode(g), np.asarray(w))
    metrics = batched[1].state.metrics
    assert sample(metrics.first_step, "_count") >= len(asks)  # one per request
    images, calls = sample(metrics.step_images, "_sum"), sample(metrics.step_images, "_count")
    assert images > calls, "no Euler step call held more than one image: the requests did not share steps"
    text = httpx.get(batched[0] + "/metrics").text
    for name in ("janusflow_time_to_first_euler_step_seconds_bucket", "janusflow_images_generated_total",
                 "janusflow_euler_step_images_bucket", "janusflow_running_image_requests"):
        assert name in text, name
