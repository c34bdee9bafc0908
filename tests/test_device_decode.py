"""The device-resident decode and Euler loops (runtime/decode.py, euler_step.euler_loop_tensors,
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


class SeamCounter:
    """Wraps a real backend: counts calls through each seam and checks that the device-resident seam
    carries only torch tensors on the backend's device (never numpy)."""

    def __init__(self, inner):
        self.inner, self.name, self.specs, self.device = inner, inner.name, inner.specs, inner.device
        self.calls: Counter = Counter()

    def run(self, graph, feeds):
        self.calls["run"] += 1
        return self.inner.run(graph, feeds)

    def run_tensors(self, graph, feeds):
        self.calls["run_tensors"] += 1
        assert all(isinstance(v, torch.Tensor) and v.device == self.device for v in feeds.values()), graph
        out = self.inner.run_tensors(graph, feeds)
        assert all(isinstance(v, torch.Tensor) and v.device == self.device for v in out.values()), graph
        return out

    @property
    def kv_dtype(self):
        return getattr(self.inner, "kv_dtype", np.float32)


@pytest.fixture(scope="module")
def ort(tiny_onnx, tiny_dir):
    from janusflow_trt.janusflow_ref.config import load_config
    from janusflow_trt.runtime.backends import OrtBackend

    return OrtBackend(tiny_onnx, load_config(tiny_dir), threads=2)


def _old_host_loop(backend, cfg, inputs, params):
    """The decode loop as it was before the device seam: numpy cache, janusflow_ref's sampler."""
    from janusflow_trt.runtime import chat

    ids = inputs.input_ids.numpy()
    image_embeds = backend.run("siglip", {"pixel_values": inputs.pixel_values.numpy()})["image_embeds"]
    embeds = backend.run("embed", {"input_ids": ids})["inputs_embeds"].copy()
    embeds[0, inputs.image_positions.numpy()] = image_embeds[0]
    cache = chat.new_cache(cfg, 1, ids.shape[1])
    logits = chat.prefill(backend, cache, embeds)
    out = []
    for i in range(params.max_new_tokens):
        out.append(int(next_token(torch.from_numpy(logits), params, i)[0]))
        if i + 1 < params.max_new_tokens:
            logits = chat.decode_one_token(backend, cache, out[-1])
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_decode_loop_reads_only_the_token_id(ort, tiny_dir, processor, test_image, temperature, monkeypatch):
    from PIL import Image

    from janusflow_trt.janusflow_ref.config import load_config
    from janusflow_trt.runtime import chat, decode
    from janusflow_trt.runtime.kv_cache import bucket

    cfg = load_config(tiny_dir)
    inputs = processor.chat_inputs(Image.open(test_image), "What is this?", chat.SYSTEM_PROMPT)
    start = inputs.input_ids.shape[1]
    n = bucket(start) - start + 4  # the loop crosses a KV bucket: the growth happens inside it
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=n)
    grows = Counter()
    grow = decode.DeviceKV.grow
    monkeypatch.setattr(decode.DeviceKV, "grow", lambda self: (grows.update(["grow"]), grow(self))[1])
    seam = SeamCounter(ort)
    torch.manual_seed(5)
    gen = chat.chat_tokens(seam, cfg, inputs, params, eos_id=-100)  # no EOS: all n tokens
    toks = [next(gen)]  # per request: image, embeddings, prefill, cache to the device
    before = dict(seam.calls)
    with count_crossings() as c:
        toks += [next(gen) for _ in range(n - 1)]
    assert dict(c) == {"__int__": n - 1}  # one host read per token: the id
    assert seam.calls["run"] == before["run"]  # no call through the numpy seam inside the loop
    assert seam.calls["run_tensors"] - before.get("run_tensors", 0) == 2 * (n - 1)  # embed + llm per token
    assert grows["grow"] == 1
    torch.manual_seed(5)
    assert toks == _old_host_loop(ort, cfg, inputs, params)  # the same answer as the host loop


def test_euler_loop_crosses_nothing(ort, tiny_dir, processor):
    from janusflow_trt.janusflow_ref.config import load_config
    from janusflow_trt.runtime import text2img
    from janusflow_trt.runtime.euler_step import euler_loop_tensors

    cfg = load_config(tiny_dir)
    seam = SeamCounter(ort)
    cache = text2img.prefill_prefix(seam, cfg, processor, "a red fox", 2)
    z = np.random.default_rng(0).standard_normal((2, 4, 48, 48)).astype(np.float32)
    steps = 4
    loop = euler_loop_tensors(seam, cache, z, steps, 2.0)
    got = [next(loop).clone()]  # per request: K/V, constants, timestep table to the device
    before = dict(seam.calls)
    with count_crossings() as c:
        got += [next(loop).clone() for _ in range(steps - 1)]
    assert dict(c) == {}
    assert seam.calls["run"] == before["run"]
    assert seam.calls["run_tensors"] - before["run_tensors"] == 3 * (steps - 1)  # gen_enc, llm_gen, gen_dec
    want = list(text2img.euler_loop(ort, cache, z, steps, 2.0))  # the numpy-seam pipeline
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
