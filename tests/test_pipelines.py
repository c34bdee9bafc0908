"""Both pipelines on the tiny checkpoint: determinism, the runtime (prefix reuse, static KV cache)
against the official-style reference, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from rt import rt_chat, rt_euler

from janusflow_trt.cli import main
from janusflow_trt.janusflow_ref import generation as ref_gen
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.janusflow_ref.understanding import chat as ref_chat
from janusflow_trt.runtime.torch_backend import TorchBackend


@pytest.fixture(scope="module")
def image(test_image):
    return Image.open(test_image).convert("RGB")


@pytest.fixture(scope="module")
def fast(tiny_model, tiny_vae):
    return TorchBackend(tiny_model, tiny_vae, threads=2)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def test_chat_greedy_deterministic_and_streamed(tiny_model, processor, image):
    seen = []
    a = ref_chat(tiny_model, processor, image, "What is this?", SamplingParams(max_new_tokens=12), on_token=seen.append)
    b = ref_chat(tiny_model, processor, image, "What is this?", SamplingParams(max_new_tokens=12))
    assert a.token_ids == b.token_ids == seen and len(a.token_ids) == 12
    assert a.text == processor.decode(a.token_ids)


def test_chat_sampling_is_seeded(tiny_model, processor, image):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16)
    a = ref_chat(tiny_model, processor, image, "q", p, seed=1)
    b = ref_chat(tiny_model, processor, image, "q", p, seed=1)
    c = ref_chat(tiny_model, processor, image, "q", p, seed=2)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize("params,seed", [(SamplingParams(max_new_tokens=20), 0),
                                         (SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=20), 5)])
def test_runtime_chat_equals_reference(tiny_model, processor, image, fast, params, seed):
    want = ref_chat(tiny_model, processor, image, "Describe the image.", params, seed)
    got = rt_chat(fast, tiny_model.cfg, processor, image, "Describe the image.", params, seed)
    assert got == want.token_ids


def test_prefix_reuse_equals_full_recompute(tiny_model, processor, fast):
    n, steps, w = 2, 3, 4.0
    z0 = ref_gen.initial_latents(n, 7)
    prefix, mask = ref_gen.prompt_prefix(tiny_model, processor, "a red fox in the snow", n)
    for z_ref in ref_gen.euler_steps(tiny_model, prefix, mask, z0, steps, w):
        pass
    z_rt = rt_euler(fast, tiny_model.cfg, processor, "a red fox in the snow", z0, steps, w)[-1]
    assert rel(z_rt, z_ref) < 1e-4


def test_cfg_rows_attend_as_official(tiny_model, processor, fast):
    """Runtime step-0 velocities vs an independent construction: the cond row is the plain causal
    forward of [prompt, t_emb, latents]; the uncond row is [BOS, t_emb, latents] alone at positions
    0, P, P+1, ... (the official mask hides the P-1 pads after BOS but keeps their positions)."""
    from janusflow_trt.export.specs import build_specs, compare
    from janusflow_trt.runtime import text2img
    from janusflow_trt.runtime.euler_step import euler_state

    m, prompt = tiny_model, "a red fox in the snow"
    ids = processor.generation_ids(prompt)
    P, G = len(ids) - 1, m.cfg.num_gen_tokens
    z = ref_gen.initial_latents(1, 3)
    t = torch.tensor([400.0])
    cache = text2img.prefill_prefix(fast, m.cfg, processor, prompt, 1)
    st = euler_state(fast, cache, z, 10, 2.0)  # the Euler step's own buffers: prefix mask, positions, K/V
    enc = fast.run("gen_enc", {"z": st.z, "t": torch.full((2,), 400.0)})
    hidden = fast.run("llm_gen", {"inputs_embeds": enc["step_embeds"], "attention_mask": st.mask,
                                  "position_ids": st.positions, **st.kv})["last_hidden_state"]
    got = fast.run("gen_dec", {"hidden": hidden, "skip": enc["skip"], "t_emb": enc["t_emb"], "z": st.z,
                               "cfg_weight": st.cfg_weight, "dt": st.dt})["velocity"].numpy()
    with torch.inference_mode():
        z_emb, t_emb, skip = m.gen_encode(z, t)
        tail = torch.cat([t_emb[:, None], z_emb], dim=1)
        cond_in = torch.cat([m.embed_tokens(torch.tensor([ids[:-1]])), tail], dim=1)
        h_c = m.language_model.model(inputs_embeds=cond_in).last_hidden_state
        unc_in = torch.cat([m.embed_tokens(torch.tensor([ids[:1]])), tail], dim=1)
        pos = torch.tensor([[0, *range(P, P + 1 + G)]])
        h_u = m.language_model.model(inputs_embeds=unc_in, position_ids=pos).last_hidden_state
        want = torch.cat([m.gen_decode(h[:, -G:], skip, t_emb) for h in (h_c, h_u)]).numpy()
    tol = build_specs(m.cfg)["gen_dec"].outputs[0].tol
    for row, name in ((0, "cond"), (1, "uncond")):
        r = compare(got[row], want[row], tol)
        assert r["ok"], f"{name} velocity: {r}"


def test_init_latents_pass_through_and_seed():
    z_a = ref_gen.initial_latents(2, 3)
    z_b = ref_gen.initial_latents(2, 3, z_a.numpy())
    assert torch.equal(z_a, z_b) and not torch.equal(z_a, ref_gen.initial_latents(2, 4))


def test_cli_generate_writes_pngs_and_latents(tiny_dir, tmp_path, capsys):
    z = np.random.RandomState(0).randn(2, 4, 48, 48).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    outs = {}
    for backend in ("torch", "torch-fast"):
        rc = main(["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--steps", "2", "--num-images", "2",
                   "--init-latents", str(tmp_path / "z.npy"), "--save-latents", str(tmp_path / f"{backend}.npy"),
                   "--out", str(tmp_path / f"{backend}.png"), "--json", "--backend", backend])
        assert rc == 0
        res = json.loads(capsys.readouterr().out)
        assert len(res["images"]) == 2
        ims = [np.asarray(Image.open(p)) for p in res["images"]]
        assert all(im.shape == (384, 384, 3) and im.dtype == np.uint8 for im in ims)
        outs[backend] = np.load(tmp_path / f"{backend}.npy")
    assert rel(outs["torch-fast"], outs["torch"]) < 1e-4


def test_cli_chat_json(tiny_dir, test_image, capsys):
    rc = main(["chat", "--model", str(tiny_dir), "--image", str(test_image), "--question", "What?",
               "--max-new-tokens", "5", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["token_ids"]) == 5 and isinstance(res["text"], str) and "total_s" in res["timings"]
