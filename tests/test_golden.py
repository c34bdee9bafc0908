"""Every backend against golden tensors written by the OFFICIAL deepseek-ai/Janus code
(tools/make_golden.py; tests/golden/README.md). Floats within the specs' Tol, ids and tokens exactly.

The golden checkpoint is regenerated here (make-tiny --size golden --seed 0) and must hash to the
one the goldens came from. Cost: the official widths (LLM 2048, SigLIP 1024, UViT 768) make each
Euler step ~1 s on 2 cores, so the full 30 steps + VAE run on one backend (torch-fast) and the first
steps on the others.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from janusflow_trt.export.specs import Tol, build_specs, compare
from janusflow_trt.janusflow_ref import generation as ref_gen
from janusflow_trt.janusflow_ref.sampling import SamplingParams

GOLDEN = Path(__file__).parent / "golden"
pytestmark = pytest.mark.skipif(not (GOLDEN / "meta.json").is_file(),
                                reason=f"no golden tensors in {GOLDEN} (tools/make_golden.py writes them)")
BACKENDS = ("torch", "torch-fast", "ort")


@pytest.fixture(scope="module")
def meta():
    return json.loads((GOLDEN / "meta.json").read_text())


@pytest.fixture(scope="module")
def gchat():
    return dict(np.load(GOLDEN / "chat.npz"))


@pytest.fixture(scope="module")
def ggen():
    return dict(np.load(GOLDEN / "generation.npz"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, meta):
    from janusflow_trt.tiny import make_tiny

    out = make_tiny(tmp_path_factory.mktemp("golden") / "ck", size="golden", seed=0)
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert digest == meta["model_safetensors_sha256"], (
        "make-tiny --size golden no longer writes the checkpoint the goldens came from; regenerate them "
        "with tools/make_golden.py")
    return out


@pytest.fixture(scope="module")
def model(ckpt):
    from janusflow_trt.janusflow_ref.weights import load_model

    return load_model(ckpt)


@pytest.fixture(scope="module")
def vae(ckpt):
    from janusflow_trt.janusflow_ref.vae import load_vae

    return load_vae(ckpt / "vae")


@pytest.fixture(scope="module")
def processor(ckpt):
    from janusflow_trt.janusflow_ref.processor import Processor

    return Processor(ckpt)


@pytest.fixture(scope="module")
def specs(model):
    return build_specs(model.cfg)


@pytest.fixture(scope="module")
def backends(ckpt, model, vae, tmp_path_factory):
    """name -> runtime backend (the torch reference is not one: it is called directly)."""
    from janusflow_trt.export_job import export_graphs
    from janusflow_trt.runtime.backends import OrtBackend
    from janusflow_trt.runtime.torch_backend import TorchBackend

    onnx = tmp_path_factory.mktemp("golden_onnx") / "onnx"
    export_graphs(ckpt, None, onnx, progress=False)
    return {"torch-fast": TorchBackend(model, vae, threads=2), "ort": OrtBackend(onnx, model.cfg, threads=2)}


def runtime(request, name: str):
    """The runtime backend `name`, built on first use (the torch-reference cases never export)."""
    return request.getfixturevalue("backends")[name]


@pytest.fixture(scope="module")
def image():
    return Image.open(GOLDEN / "input.png").convert("RGB")


@pytest.fixture(scope="module")
def chat_inputs(processor, image, meta):
    return processor.chat_inputs(image, meta["question"])


def check(name: str, got, want, tol: Tol) -> None:
    r = compare(np.asarray(got, np.float32), np.asarray(want, np.float32), tol)
    assert r["ok"], f"{name}: {r}"


def tol_of(specs, graph: str, output: str) -> Tol:
    return next(t.tol for t in specs[graph].outputs if t.name == output)


# -- understanding ------------------------------------------------------------------------------

def test_chat_prompt_and_pixels(chat_inputs, gchat, specs):
    np.testing.assert_array_equal(chat_inputs.input_ids[0].numpy(), gchat["chat_input_ids"])
    assert gchat["chat_attention_mask"].all()  # one unpadded row: our runtime attends to all of it
    want_pos = np.nonzero(gchat["chat_images_seq_mask"])[0]
    np.testing.assert_array_equal(chat_inputs.image_positions.numpy(), want_pos)
    # preprocessing is exact in FP32; the embed graph's Tol is the tightest the specs hold
    check("pixel_values", chat_inputs.pixel_values[0], gchat["pixel_values"], tol_of(specs, "embed", "inputs_embeds"))


def spliced_embeds(backend_name, model, request, chat_inputs) -> tuple[np.ndarray, np.ndarray]:
    """-> (SigLIP features or None, spliced input embeddings [T, H]); backends are built only when needed."""
    ids, pix, pos = chat_inputs.input_ids, chat_inputs.pixel_values, chat_inputs.image_positions
    if backend_name == "torch":
        with torch.inference_mode():
            feats = model.vision_und_enc_model(pix)[0].numpy()
            emb = model.embed_tokens(ids)[0].clone()
            emb[pos] = model.encode_image(pix)[0]
        return feats, emb.numpy()
    from janusflow_trt.runtime.chat import prompt_embeds

    return None, prompt_embeds(runtime(request, backend_name), chat_inputs)[0].numpy().copy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_and_spliced_embeddings(backend, model, request, chat_inputs, gchat, specs, meta):
    feats, emb = spliced_embeds(backend, model, request, chat_inputs)
    tol = tol_of(specs, "siglip", "image_embeds")
    rows = slice(None, None, meta["rows_stride"])
    if feats is not None:
        check("siglip features", feats[rows], gchat["siglip_features_rows"], tol)
    seq = gchat["chat_images_seq_mask"]
    img_rows = np.nonzero(seq)[0]
    check("begin-of-understanding", emb[img_rows[0]], gchat["begin_of_und_embed"], tol)
    check("image embeddings", emb[img_rows[1:][rows]], gchat["image_embeds_rows"], tol)
    check("text embeddings", emb[~seq], gchat["text_embeds"], tol_of(specs, "embed", "inputs_embeds"))


def test_reference_logits_every_greedy_step(model, chat_inputs, gchat, specs):
    """Teacher-forced over the official greedy answer: the logits of all 20 decoding positions."""
    _, emb = spliced_embeds("torch", model, None, chat_inputs)
    toks = torch.from_numpy(gchat["greedy_tokens"][:-1])[None]
    with torch.inference_mode():
        full = torch.cat([torch.from_numpy(emb)[None], model.embed_tokens(toks)], dim=1)
        logits = model.language_model(inputs_embeds=full).logits[0, emb.shape[0] - 1:]
    check("logits", logits.numpy(), gchat["greedy_logits"], tol_of(specs, "llm", "logits"))


@pytest.mark.parametrize("backend", ("torch-fast", "ort"))
def test_runtime_first_step_logits(backend, model, backends, request, chat_inputs, gchat, specs):
    from janusflow_trt.runtime.chat import chat_prefill

    _, logits = chat_prefill(backends[backend], model.cfg, chat_inputs)
    check("first-step logits", logits[0].numpy(), gchat["greedy_logits"][0], tol_of(specs, "llm", "logits"))


@pytest.mark.parametrize("mode", ("greedy", "demo", "broad"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_tokens_exact(backend, mode, model, request, processor, image, gchat, meta):
    if mode == "greedy":
        params, seed, want = SamplingParams(max_new_tokens=meta["max_new_tokens"]), meta["chat_seed"], "greedy"
    else:
        s = next(s for s in meta["sampled"] if s["name"] == mode)
        params = SamplingParams(temperature=s["temperature"], top_p=s["top_p"], max_new_tokens=meta["max_new_tokens"])
        seed, want = s["seed"], f"sampled_{mode}"
    if backend == "torch":
        from janusflow_trt.janusflow_ref.understanding import chat

        got = chat(model, processor, image, meta["question"], params, seed).token_ids
    else:
        from rt import rt_chat

        got = rt_chat(runtime(request, backend), model.cfg, processor, image, meta["question"], params, seed)
    assert got == gchat[f"{want}_tokens"].tolist()


# -- generation ---------------------------------------------------------------------------------

def test_generation_prompt_rows_mask_schedule_noise(processor, model, meta, ggen):
    n = meta["num_images"]
    ids = ref_gen.prompt_ids(processor, meta["prompt"], model.cfg)
    np.testing.assert_array_equal(ids, ggen["gen_input_ids"])
    tokens, _ = ref_gen.cfg_rows(ids, n, processor.pad_id)
    np.testing.assert_array_equal(tokens.numpy(), ggen["cfg_tokens"])
    mask = ref_gen.generation_mask(n, len(ids) - 1, model.cfg.num_gen_tokens)
    np.testing.assert_array_equal(mask.numpy(), ggen["cfg_attention_mask"])
    ts = [ref_gen.timestep(s, meta["steps"]) for s in range(meta["steps"])]
    np.testing.assert_array_equal(np.array(ts, np.float64), ggen["t_schedule"])
    np.testing.assert_array_equal(ref_gen.initial_latents(n, meta["gen_seed"]).numpy(), ggen["z0"])


def reference_step0(model, processor, meta, ggen):
    n, steps = meta["num_images"], meta["steps"]
    prefix, mask = ref_gen.prompt_prefix(model, processor, meta["prompt"], n)
    z = torch.from_numpy(ggen["z0"])
    with torch.inference_mode():
        z2 = torch.cat([z, z])
        t = torch.full((2 * n,), ref_gen.timestep(0, steps))
        z_emb, t_emb, skip = model.gen_encode(z2, t)
        llm_in = torch.cat([prefix, t_emb[:, None], z_emb], dim=1)
        hidden = model.language_model.model(inputs_embeds=llm_in, attention_mask=mask).last_hidden_state
        v = model.gen_decode(hidden[:, -z_emb.shape[1]:], skip, t_emb)
    return llm_in[:, -z_emb.shape[1] - 1:].numpy(), t_emb.numpy(), v.numpy()


def runtime_step0(backend, model, processor, meta, ggen):
    from rt import rt_step0

    return rt_step0(backend, model.cfg, processor, meta["prompt"], ggen["z0"], meta["steps"], meta["cfg_weight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_step0_t_emb_and_velocities(backend, model, request, processor, meta, ggen, specs):
    if backend == "torch":
        step_in, t_emb, v = reference_step0(model, processor, meta, ggen)
    else:
        step_in, t_emb, v = runtime_step0(runtime(request, backend), model, processor, meta, ggen)
    n = meta["num_images"]
    check("t_emb", t_emb, ggen["step0_t_emb"], tol_of(specs, "gen_enc", "t_emb"))
    rows = slice(None, None, meta["rows_stride"])
    check("step-0 LLM input", step_in[:, rows], ggen["step0_llm_in_rows"], tol_of(specs, "gen_enc", "step_embeds"))
    vtol = tol_of(specs, "gen_dec", "velocity")
    check("v_cond", v[:n], ggen["step0_velocity"][:n], vtol)
    check("v_uncond", v[n:], ggen["step0_velocity"][n:], vtol)


def latents(backend_name, model, request, processor, meta, ggen, steps_to_run):
    """z after each of the first `steps_to_run` steps of a `meta['steps']`-step schedule."""
    n, steps, w = meta["num_images"], meta["steps"], meta["cfg_weight"]
    if backend_name == "torch":
        prefix, mask = ref_gen.prompt_prefix(model, processor, meta["prompt"], n)
        it = ref_gen.euler_steps(model, prefix, mask, torch.from_numpy(ggen["z0"]), steps, w)
        return [next(it).numpy() for _ in range(steps_to_run)]
    import itertools

    from janusflow_trt.runtime import text2img
    from janusflow_trt.runtime.euler_step import euler_loop

    b = runtime(request, backend_name)
    cache = text2img.prefill_prefix(b, model.cfg, processor, meta["prompt"], n)
    it = euler_loop(b, cache, torch.from_numpy(ggen["z0"]), steps, w)
    return [z.numpy().copy() for z in itertools.islice(it, steps_to_run)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_euler_steps(backend, model, request, processor, meta, ggen, specs):
    zs = latents(backend, model, request, processor, meta, ggen, meta["first_steps"])
    for i, z in enumerate(zs):
        check(f"z after step {i + 1}", z, ggen["latents_first_steps"][i], tol_of(specs, "gen_dec", "z_next"))


def test_full_run_and_image_torch_fast(model, backends, request, processor, meta, ggen, specs):
    from rt import rt_vae

    from janusflow_trt.images import to_uint8

    b = backends["torch-fast"]
    z = latents("torch-fast", model, request, processor, meta, ggen, meta["steps"])[-1]
    check(f"z after {meta['steps']} steps", z, ggen["latents_final"], tol_of(specs, "gen_dec", "z_next"))
    img = rt_vae(b, z)
    check("decoded image crop", img[:, :, 176:208, 176:208], ggen["decoded_center"], tol_of(specs, "vae_dec", "image"))
    diff = np.abs(to_uint8(img).astype(np.int16) - ggen["image_uint8"].astype(np.int16))
    assert diff.max() <= 1, f"uint8 image differs by {diff.max()} levels"  # within Tol, truncation may flip 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_vae_decode_of_the_official_latents(backend, vae, request, ggen, specs):
    z = ggen["latents_final"]
    if backend == "torch":
        img = ref_gen.vae_decode(vae, torch.from_numpy(z)).numpy()
    else:
        from rt import rt_vae

        img = rt_vae(runtime(request, backend), z)
    check("decoded image crop", img[:, :, 176:208, 176:208], ggen["decoded_center"], tol_of(specs, "vae_dec", "image"))
