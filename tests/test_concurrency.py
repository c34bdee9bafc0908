"""One Pipeline shared by threads: calls are serialised (janusflow_trt/api.py), so each thread's result
equals the same call made alone; a nested call from the thread holding the Pipeline is refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from janusflow_trt import Pipeline
from janusflow_trt.errors import JanusFlowError


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return Pipeline.from_pretrained(tiny_dir, backend="torch-fast", threads=1)


def calls(pipe, image):
    """name -> a call; sampled chats (the global RNG) and generates of different sizes."""
    return {
        "chat_a": lambda: pipe.chat(image, "What is it?", max_new_tokens=12, temperature=0.8, seed=1).token_ids,
        "chat_b": lambda: pipe.chat(image, "And the colours?", max_new_tokens=9, temperature=1.0, seed=2).token_ids,
        "stream": lambda: "".join(pipe.chat_stream(image, "Where?", max_new_tokens=10, temperature=0.9, seed=3)),
        "gen_1": lambda: pipe.generate("a red fox", steps=2, seed=4).latents,
        "gen_2": lambda: pipe.generate("a blue bird", steps=3, num_images=2, seed=5).latents,
    }


def test_threads_get_their_sequential_results(pipe, test_image):
    image = Image.open(test_image).convert("RGB")
    jobs = calls(pipe, image)
    alone = {k: f() for k, f in jobs.items()}
    order = [k for _ in range(2) for k in jobs]  # every call twice, all in flight together
    with ThreadPoolExecutor(max_workers=3) as ex:
        got = list(ex.map(lambda k: jobs[k](), order))
    for k, g in zip(order, got, strict=True):
        if isinstance(g, np.ndarray):
            np.testing.assert_array_equal(g, alone[k], err_msg=k)
        else:
            assert g == alone[k], k


def test_a_nested_call_from_the_holding_thread_is_refused(pipe, test_image):
    stream = pipe.chat_stream(test_image, "What is it?", max_new_tokens=4)
    next(stream)
    with pytest.raises(JanusFlowError, match="already running a call in this thread"):
        pipe.chat(test_image, "What is it?", max_new_tokens=2)
    stream.close()  # releases the Pipeline
    assert pipe.chat(test_image, "What is it?", max_new_tokens=2).token_ids

    def reenter(step, z):
        pipe.chat(test_image, "What is it?", max_new_tokens=2)

    with pytest.raises(JanusFlowError, match="already running"):
        pipe.generate("a fox", steps=1, callback=reenter)
    assert pipe.generate("a fox", steps=1).latents.shape == (1, 4, 48, 48)
