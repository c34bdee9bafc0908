"""The image side of `janusflow serve` on the tiny checkpoint over the tiny ONNX export (ort), spoken to
with the real `openai` client: streamed images (partial previews of the predicted clean latent, then the
completed images) and Euler-step batching across requests, each request's result equal to its own solo
run (and to the CLI's)."""

from __future__ import annotations

import base64
import io

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


@pytest.mark.parametrize("n, partials, at", [(1, 2, [2, 4]), (2, 3, [1, 3, 4])])
def test_streamed_images_partials_then_completed(solo, ref, n, partials, at):
    """partial_images evenly spaced previews (partial_image_index 0..), for each of the n images, then
    each image's completed event: equal to the solo Pipeline's images; previews equal to the definition
    computed from the Pipeline's own latents at those steps."""
    zs: list[np.ndarray] = []
    want = ref.generate("a red fox", num_images=n, steps=STEPS, seed=3, callback=lambda i, z: zs.append(z.copy()))
    events = list(openai_client(solo).images.generate(
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
        assert np.array_equal(decode(e.b64_json), np.asarray(want.images[i])), i
        assert e.usage.output_tokens == n * ref.cfg.num_gen_tokens and e.usage.input_tokens > 0
