"""Processor against hand-worked prompts, token layouts and pixel values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from janusflow_trt.janusflow_ref.processor import ImageConfig, preprocess_image, sft_prompt

SYS = ("You are a helpful language and vision assistant. You are able to understand the visual content that the "
       "user provides, and assist the user with a variety of tasks using natural language.")


def test_chat_prompt_text(processor):
    want = SYS + "\n\nUser: <image_placeholder>\nWhat is in the picture?\n\nAssistant:"
    assert processor.chat_prompt("What is in the picture?  ") == want
    # content is f"<image_placeholder>\n{question}".strip(): leading spaces of the question survive
    assert "<image_placeholder>\n  Why?\n\n" in processor.chat_prompt("  Why?")


def test_generation_prompt_text(processor):
    assert processor.generation_prompt(" A red fox ") == "User: A red fox\n\nAssistant:<begin_of_image>"


def test_template_multi_turn_separators():
    got = sft_prompt([("User", "hi"), ("Assistant", "hello"), ("User", "bye"), ("Assistant", "")], "sys")
    assert got == "sys\n\nUser: hi\n\nAssistant: hello<｜end▁of▁sentence｜>User: bye\n\nAssistant:"


def test_chat_token_layout(processor):
    inp = processor.chat_inputs(Image.new("RGB", (64, 64), (10, 20, 30)), "Describe it.")
    ids = inp.input_ids[0].tolist()
    assert ids[0] == processor.bos_id
    boi = ids.index(processor.image_start_id)
    # <begin_of_image>, 576 x <image_placeholder>, <end_of_image>, then "\nDescribe it.\n\nAssistant:"
    assert ids[boi + 1:boi + 577] == [processor.image_id] * 576
    assert ids[boi + 577] == processor.image_end_id
    assert inp.image_positions.tolist() == list(range(boi, boi + 577))
    assert processor.decode(ids[1:boi]) == SYS + "\n\nUser: "
    assert processor.decode(ids[boi + 578:]) == "\nDescribe it.\n\nAssistant:"
    assert processor.image_id not in ids[:boi] and processor.image_id not in ids[boi + 578:]


def test_generation_ids_end_with_begin_of_image(processor):
    ids = processor.generation_ids("a cat")
    assert ids[0] == processor.bos_id and ids[-1] == processor.image_start_id
    assert processor.decode(ids) == "User: a cat\n\nAssistant:"


GRAY = 127 / 255 / 0.5 - 1.0  # background int(0.5*255)=127, rescaled then normalised by mean=std=0.5


@pytest.mark.parametrize("size,axis", [((100, 50), 0), ((50, 100), 1)])
def test_pixels_wide_and_tall(size, axis):
    cfg = ImageConfig(image_size=384, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    x = preprocess_image(Image.new("RGB", size, (255, 0, 0)), cfg)
    assert x.shape == (3, 384, 384) and x.dtype == np.float32
    # long side -> 384, short side int(50/100*384) = 192, centred: offset (384-192)//2 = 96
    inside = [slice(None)] * 3
    inside[1 + axis] = slice(96, 288)
    pad = [slice(None)] * 3
    pad[1 + axis] = slice(0, 96)
    np.testing.assert_allclose(x[tuple(inside)][0], 1.0, atol=1e-6)
    np.testing.assert_allclose(x[tuple(inside)][1:], -1.0, atol=1e-6)
    np.testing.assert_allclose(x[tuple(pad)], GRAY, atol=1e-6)
    pad[1 + axis] = slice(288, 384)
    np.testing.assert_allclose(x[tuple(pad)], GRAY, atol=1e-6)


def test_pixels_min_size_and_clip_mean():
    cfg = ImageConfig(image_size=384)  # CLIP mean/std defaults -> background (122, 116, 104)
    assert cfg.background_color == (122, 116, 104)
    x = preprocess_image(Image.new("RGB", (1000, 10), (0, 0, 0)), cfg)
    # short side int(10/1000*384)=3 is raised to min_size 14, centred at (384-14)//2 = 185
    mean, std = np.array(cfg.image_mean, np.float32), np.array(cfg.image_std, np.float32)
    black = (0.0 - mean) / std
    np.testing.assert_allclose(x[:, 185:199, :], np.broadcast_to(black[:, None, None], (3, 14, 384)), rtol=1e-5)
    bg = (np.array([122, 116, 104], np.float32) / 255 - mean) / std
    np.testing.assert_allclose(x[:, 0, 0], bg, rtol=1e-5)
    np.testing.assert_allclose(x[:, 184, 5], bg, rtol=1e-5)


def test_grayscale_and_rgba_become_rgb(processor):
    for mode in ("L", "RGBA", "P"):
        inp = processor.chat_inputs(Image.new(mode, (30, 40)), "q")
        assert inp.pixel_values.shape == (1, 3, 384, 384)
