"""The device-resident decode and Euler loops (runtime/decode.py, runtime/euler_step.py,
runtime/device_sampling.py), on the CPU: the device sampler against janusflow_ref's sampler, and the
host crossings inside the loops counted on the real code path (ORT IOBinding over torch tensors)."""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import pytest
import torch

from janusflow_trt.errors import InputError
from janusflow_trt.janusflow_ref.sampling import SamplingParams, next_token
from janusflow_trt.runtime.backends import SeamWrapper
from janusflow_trt.runtime.device_sampling import NONFINITE, OVERFLOW, sample_on_device

PARAMS = [SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.0),
          SamplingParams(temperature=1.5, top_p=0.5, top_k=0), SamplingParams(temperature=0.3, top_k=5),
          SamplingParams(temperature=2.0, top_p=0.95, top_k=200)]


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"T{p.temperature}-p{p.top_p}-k{p.top_k}")
def test_device_sampler_draws_the_reference_tokens(p):
    """Same seed, same logits -> the same tokens as janusflow_ref.sampling.next_token (transformers'
    warpers + torch.multinomial on the global RNG), over 200 draws of 2 rows."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 500, generator=g) * 3 for _ in range(200)]
    logits[0][0, :10] = 7.0  # ties at the top
    torch.manual_seed(11)
    want = [next_token(x, p).tolist() for x in logits]
    torch.manual_seed(11)
    got = [sample_on_device(x, p).tolist() for x in logits]
    assert got == want
    assert len({t for row in got for t in row}) > (1 if p.greedy else 20)  # not a degenerate draw


@pytest.mark.parametrize("top_p", [0.25, 0.5, 0.75])
def test_device_warp_at_the_top_p_boundary(top_p):
    """Equal logits put the cumulative probability exactly on 1 - top_p (0.25 steps, exact in float32):
    which side of the boundary a token falls on must match transformers' warper."""
    from janusflow_trt.janusflow_ref.sampling import warp
    from janusflow_trt.runtime.device_sampling import warp_on_device

    x = torch.zeros(1, 4)
    p = SamplingParams(temperature=1.0, top_p=top_p, top_k=0)
    want, got = warp(x.clone(), p), warp_on_device(x.clone(), p)
    assert torch.isinf(want).sum() == round(4 * (1 - top_p))  # the boundary is really hit
    kept = ~torch.isinf(want)
    assert torch.equal(torch.isinf(got), ~kept) and torch.equal(got[kept], want[kept])


def test_device_sampler_sentinels():
    bad = torch.zeros(2, 8)
    bad[1, 3] = float("nan")
    assert sample_on_device(bad, SamplingParams()).tolist()[1] == NONFINITE
    assert sample_on_device(bad, SamplingParams(temperature=0.5)).tolist()[1] == NONFINITE
    hot = torch.full((1, 8), 1e36)
    hot[0, 0] = -1e36
    assert sample_on_device(hot, SamplingParams(temperature=1e-3, top_k=0)).tolist() == [OVERFLOW]
    with pytest.raises(InputError, match="overflows"):  # the reference refuses the same logits
        next_token(hot, SamplingParams(temperature=1e-3, top_k=0))


# -- host crossings, counted on the real path --------------------------------------------------------
HOST_READS = [(torch.Tensor, n) for n in ("numpy", "item", "tolist", "cpu", "__int__", "__float__", "__bool__",
                                          "__array__", "__index__")]
HOST_WRITES = [(torch, n) for n in ("from_numpy", "as_tensor", "tensor")]


@contextlib.contextmanager
def count_crossings():
    """Counts every torch <-> host value crossing (numpy views, scalar reads, host->tensor creation)
    made while the block runs, by wrapping those torch entry points (they still do their work)."""
    counts: Counter = Counter()
    saved = []
    for owner, name in HOST_READS + HOST_WRITES:
        orig = getattr(owner, name)

        def wrapped(*a, __orig=orig, __name=name, **k):
            counts[__name] += 1
            return __orig(*a, **k)

        saved.append((owner, name, orig))
        setattr(owner, name, wrapped)
    try:
        yield counts
    finally:
        for owner, name, orig in saved:
            setattr(owner, name, orig)


class SeamCounter(SeamWrapper):
    """Wraps a real backend: counts the calls through the seam and checks that they carry only torch
    tensors on the backend's device (never numpy)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.calls: Counter = Counter()

    def run(self, graph, feeds):
        self.calls["run"] += 1
        assert all(isinstance(v, torch.Tensor) and v.device == self.device for v in feeds.values()), graph
        out = self.inner.run(graph, feeds)
        assert all(isinstance(v, torch.Tensor) and v.device == self.device for v in out.values()), graph
        return out


@pytest.fixture(scope="module")
def ort(tiny_onnx, tiny_dir):
    from janusflow_trt.janusflow_ref.config import load_config
    from janusflow_trt.runtime.backends import OrtBackend

    return OrtBackend(tiny_onnx, load_config(tiny_dir), threads=2)


def _reference_loop(model, inputs, params):
    """The same answer from janusflow_ref (HF cache, transformers' warpers, host sampling)."""
    from janusflow_trt.janusflow_ref.understanding import chat_tokens

    return list(chat_tokens(model, inputs, params, eos_id=-100))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_decode_loop_reads_only_the_token_id(ort, tiny_dir, tiny_model, processor, test_image, temperature,
                                             monkeypatch):
    from PIL import Image

    from janusflow_trt.janusflow_ref.config import load_config
    from janusflow_trt.runtime import chat
    from janusflow_trt.runtime.kv_cache import KVCache, bucket

    cfg = load_config(tiny_dir)
    inputs = processor.chat_inputs(Image.open(test_image), "What is this?")
    start = inputs.input_ids.shape[1]
    n = bucket(start) - start + 4  # the loop crosses a KV bucket: the growth happens inside it
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=n)
    grows = Counter()
    reserve = KVCache.reserve
    monkeypatch.setattr(KVCache, "reserve", lambda self, n: (grows.update([reserve(self, n)]), grows[True] > 0)[1])
    seam = SeamCounter(ort)
    torch.manual_seed(5)
    gen = chat.chat_tokens(seam, cfg, inputs, params, eos_id=-100)  # no EOS: all n tokens
    toks = [next(gen)]  # per request: image, embeddings, prefill, cache to the device
    before = dict(seam.calls)
    with count_crossings() as c:
        toks += [next(gen) for _ in range(n - 1)]
    assert dict(c) == {"__int__": n - 1}  # one host read per token: the id
    assert seam.calls["run"] - before["run"] == 2 * (n - 1)  # embed + llm per token
    assert grows[True] == 1  # the cache moved to its next bucket once, inside the loop
    torch.manual_seed(5)
    assert toks == _reference_loop(tiny_model, inputs, params)  # the same answer as the reference


def test_euler_loop_crosses_nothing(ort, tiny_dir, tiny_model, processor):
    from janusflow_trt.janusflow_ref import generation as ref_gen
    from janusflow_trt.janusflow_ref.config import load_config
    from janusflow_trt.runtime import text2img
    from janusflow_trt.runtime.euler_step import euler_loop

    cfg = load_config(tiny_dir)
    seam = SeamCounter(ort)
    cache = text2img.prefill_prefix(seam, cfg, processor, "a red fox", 2)
    z = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4, 48, 48)).astype(np.float32))
    steps = 4
    loop = euler_loop(seam, cache, z, steps, 2.0)
    got = [next(loop).clone()]  # per request: constants and timestep table to the device
    before = dict(seam.calls)
    with count_crossings() as c:
        got += [next(loop).clone() for _ in range(steps - 1)]
    assert dict(c) == {}
    assert seam.calls["run"] - before["run"] == 3 * (steps - 1)  # gen_enc, llm_gen, gen_dec
    prefix, mask = ref_gen.prompt_prefix(tiny_model, processor, "a red fox", 2)
    want = list(ref_gen.euler_steps(tiny_model, prefix, mask, z, steps, 2.0))  # the official-style loop
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() / b.abs().max() < 1e-4
