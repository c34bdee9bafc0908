"""OutputBuffers lifetime as documented in runtime/backends.py: a result stays valid until the second
next call of the same graph with the same shapes, and the ORT backend really writes into them."""

from __future__ import annotations

import torch

from janusflow_trt.runtime.backends import OrtBackend, OutputBuffers


def test_two_buffers_alternate():
    ob = OutputBuffers(lambda shape, dtype: torch.empty(shape, dtype=getattr(torch, dtype)))
    y2 = ({"y": (2,)}, {"y": "float32"})
    a, b = ob.get("g", *y2)["y"], ob.get("g", *y2)["y"]
    assert a is not b and a.data_ptr() != b.data_ptr()
    assert ob.get("g", *y2)["y"] is a
    other = ob.get("g", {"y": (3,)}, {"y": "float32"})["y"]  # another shape: its own pair
    assert other.shape == (3,) and other is not a and other is not b


def test_ort_result_survives_one_call_and_is_reused_by_the_second(tiny_dir, tiny_onnx):
    from janusflow_trt.janusflow_ref.config import load_config

    be = OrtBackend(tiny_onnx, load_config(tiny_dir), threads=2)
    feeds = [{"input_ids": torch.tensor([[i, i + 1, i + 2]])} for i in (3, 10, 20)]
    first = be.run("embed", feeds[0])["inputs_embeds"]
    kept = first.clone()
    second = be.run("embed", feeds[1])["inputs_embeds"]
    assert torch.equal(first, kept)  # still valid after the next call
    assert not torch.equal(second, kept)
    third = be.run("embed", feeds[2])["inputs_embeds"]
    assert third is first  # the second next call reuses the buffer
    assert not torch.equal(first, kept)
