"""Grouped-query attention (2 KV heads for 4 query heads): the reference (transformers' Llama), our
LLM graph in eager PyTorch and in ONNX Runtime must agree, through the static KV cache."""

from __future__ import annotations

from itertools import islice

import pytest
from PIL import Image
from rt import rt_chat

from janusflow_trt.export.specs import build_specs, compare
from janusflow_trt.janusflow_ref import generation as ref_gen
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.janusflow_ref.understanding import chat as ref_chat
from janusflow_trt.runtime import text2img
from janusflow_trt.runtime.backends import OrtBackend
from janusflow_trt.runtime.euler_step import euler_loop
from janusflow_trt.runtime.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    from janusflow_trt.export_job import export_graphs
    from janusflow_trt.janusflow_ref.processor import Processor
    from janusflow_trt.janusflow_ref.weights import load_model
    from janusflow_trt.tiny import make_tiny

    ck = make_tiny(tmp_path_factory.mktemp("gqa") / "ck", size="tiny-gqa", seed=3)
    onnx = tmp_path_factory.mktemp("gqa_onnx") / "onnx"
    export_graphs(ck, None, onnx, graphs="siglip,embed,llm,gen_enc,gen_dec", progress=False)
    model = load_model(ck)
    return model, Processor(ck), {"torch-fast": TorchBackend(model, threads=2),
                                  "ort": OrtBackend(onnx, model.cfg, threads=2)}


def test_preset_is_grouped(gqa):
    llm = gqa[0].cfg.llm
    assert llm.num_key_value_heads * 2 == llm.num_attention_heads


@pytest.mark.parametrize("backend", ("torch-fast", "ort"))
def test_gqa_chat_and_euler_steps(gqa, test_image, backend):
    model, processor, backends = gqa
    image = Image.open(test_image).convert("RGB")
    params = SamplingParams(max_new_tokens=12)
    want = ref_chat(model, processor, image, "What is this?", params)
    got = rt_chat(backends[backend], model.cfg, processor, image, "What is this?", params)
    assert got == want.token_ids
    z0 = ref_gen.initial_latents(1, 5)
    prefix, mask = ref_gen.prompt_prefix(model, processor, "a fox", 1)
    ref = [z.numpy() for z in islice(ref_gen.euler_steps(model, prefix, mask, z0, 30, 2.0), 2)]
    cache = text2img.prefill_prefix(backends[backend], model.cfg, processor, "a fox", 1)
    it = euler_loop(backends[backend], cache, z0, 30, 2.0)
    tol = build_specs(model.cfg)["gen_dec"].outputs[1].tol
    for i, z_ref in enumerate(ref):
        r = compare(next(it).numpy(), z_ref, tol)
        assert r["ok"], f"z after step {i + 1}: {r}"
