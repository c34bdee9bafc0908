"""Every Pipeline parameter with wrong types and values: one JanusFlowError line, before any work (the
engine is never called), with the CLI's names for the parameters (janusflow_trt/validation.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from janusflow_trt import Pipeline
from janusflow_trt.errors import JanusFlowError


class NoWork:
    """Stands in for the engine: any call is work done before the refusal."""

    def __getattr__(self, name):
        raise AssertionError(f"engine.{name} used before the input was refused")


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    p = Pipeline.from_pretrained(tiny_dir, backend="torch-fast", threads=1)
    p.engine = NoWork()
    return p


IMG = np.full((32, 32, 3), 100, np.uint8)
CHAT = [
    ("max_new_tokens", None), ("max_new_tokens", 2.0), ("max_new_tokens", "5"), ("max_new_tokens", True),
    ("max_new_tokens", 0), ("max_new_tokens", -1), ("max_new_tokens", 2**70),
    ("temperature", None), ("temperature", "0.5"), ("temperature", True), ("temperature", float("nan")),
    ("temperature", float("inf")), ("temperature", -1.0), ("temperature", 1e-9), ("temperature", 1000),
    ("top_p", None), ("top_p", "1"), ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")),
    ("seed", None), ("seed", 1.0), ("seed", "7"), ("seed", True), ("seed", -1), ("seed", 2**63), ("seed", 2**64),
    ("system_prompt", None), ("system_prompt", 3), ("system_prompt", "<begin_of_image>"),
]
GEN = [
    ("num_images", None), ("num_images", 1.0), ("num_images", "2"), ("num_images", True), ("num_images", 0),
    ("num_images", 10**6),
    ("steps", None), ("steps", 2.5), ("steps", "3"), ("steps", False), ("steps", 0), ("steps", 1001),
    ("steps", 10**8),
    ("cfg_weight", None), ("cfg_weight", "2"), ("cfg_weight", float("nan")), ("cfg_weight", 1e9),
    ("seed", None), ("seed", 2.0), ("seed", -5), ("seed", 2**64),
    ("callback", 3), ("callback", "print"),
    ("init_latents", [[0.0]]), ("init_latents", np.zeros((1, 4, 8, 8), np.float32)),
    ("init_latents", np.full((1, 4, 48, 48), np.nan, np.float32)),
]


def refused(fn, needle: str = "") -> str:
    with pytest.raises(JanusFlowError) as e:
        fn()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and needle in msg, msg
    return msg


@pytest.mark.parametrize("name,value", CHAT, ids=[f"{n}={v!r}" for n, v in CHAT])
def test_chat_parameter(pipe, name, value):
    refused(lambda: pipe.chat(IMG, "What is it?", **{name: value}))
    refused(lambda: pipe.chat_stream(IMG, "What is it?", **{name: value}))


@pytest.mark.parametrize("name,value", GEN, ids=[f"{n}={v!r}" for n, v in GEN])
def test_generate_parameter(pipe, name, value):
    refused(lambda: pipe.generate("a fox", **{name: value}))


@pytest.mark.parametrize("image", [None, 3, b"png", np.zeros((0, 0, 3), np.uint8), np.zeros((4, 4), np.uint8),
                                   np.zeros((4, 4, 3), np.float32), Image.new("RGB", (0, 0)), "/nonexistent.png"],
                         ids=["None", "int", "bytes", "0x0", "2d", "float", "pil-0x0", "missing"])
def test_chat_image(pipe, image):
    refused(lambda: pipe.chat(image, "What is it?"))


@pytest.mark.parametrize("text", [None, 5, "", "   ", "what <begin_of_image> is it", "a <image_placeholder>",
                                  "<｜begin▁of▁sentence｜>hi"])
def test_user_text(pipe, text):
    refused(lambda: pipe.chat(IMG, text))
    refused(lambda: pipe.generate(text))


@pytest.mark.parametrize("kw", [dict(backend=None), dict(backend="nope"), dict(precision=16), dict(threads=0),
                                dict(threads=2.0), dict(threads="2"), dict(threads=True), dict(threads=10**6),
                                dict(artifacts=3), dict(vae=3.5)], ids=str)
def test_from_pretrained(tiny_dir, kw):
    refused(lambda: Pipeline.from_pretrained(tiny_dir, **{"backend": "torch-fast", **kw}))


def test_model_dir_types():
    refused(lambda: Pipeline.from_pretrained(None))
    refused(lambda: Pipeline.from_pretrained(3))
