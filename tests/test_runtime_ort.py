"""The runtime on ONNX Runtime against the official-style reference, and its refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from rt import rt_chat, rt_euler, rt_vae, run_np

from janusflow_trt.cli import main
from janusflow_trt.janusflow_ref import generation as ref_gen
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.janusflow_ref.understanding import chat as ref_chat
from janusflow_trt.runtime.backends import OrtBackend
from janusflow_trt.runtime.decode import Decoder
from janusflow_trt.runtime.llm import new_cache, prefill


@pytest.fixture(scope="module")
def ort(tiny_onnx, tiny_model):
    return OrtBackend(tiny_onnx, tiny_model.cfg, threads=2)


@pytest.fixture(scope="module")
def image(test_image):
    return Image.open(test_image).convert("RGB")


@pytest.mark.parametrize("params,seed", [(SamplingParams(max_new_tokens=24), 0),
                                         (SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=24), 11)])
def test_ort_chat_tokens_equal_reference(ort, tiny_model, processor, image, params, seed):
    want = ref_chat(tiny_model, processor, image, "What is shown here?", params, seed)
    got = rt_chat(ort, tiny_model.cfg, processor, image, "What is shown here?", params, seed)
    assert got == want.token_ids and processor.decode(got) == want.text


def test_ort_generation_equals_reference(ort, tiny_model, tiny_vae, processor):
    n, steps, w = 2, 4, 5.0
    z0 = ref_gen.initial_latents(n, 21)
    prefix, mask = ref_gen.prompt_prefix(tiny_model, processor, "a lighthouse at dusk", n)
    ref = list(ref_gen.euler_steps(tiny_model, prefix, mask, z0, steps, w))
    got = rt_euler(ort, tiny_model.cfg, processor, "a lighthouse at dusk", z0, steps, w)
    for r, g in zip(ref, got, strict=True):  # every step, not just the last
        assert np.abs(g - r.numpy()).max() / np.abs(r.numpy()).max() < 1e-4
    img_ref = ref_gen.vae_decode(tiny_vae, ref[-1]).numpy()
    img = rt_vae(ort, got[-1])
    assert np.abs(img - img_ref).max() / np.abs(img_ref).max() < 1e-4


def test_kv_cache_prefill_plus_decode_equals_one_forward(ort, tiny_model):
    """Logits after prefill(k) + the decode step fed one given token at a time (teacher forcing, as the
    quality report runs it) == one full forward over all tokens."""
    import torch

    rng = np.random.default_rng(3)
    ids = rng.integers(0, tiny_model.cfg.llm.vocab_size, size=(1, 140))  # crosses a 128 bucket boundary
    with torch.inference_mode():
        full = tiny_model.language_model(input_ids=torch.from_numpy(ids)).logits[0].numpy()
    cache = new_cache(ort, tiny_model.cfg, 1, 8)
    emb = torch.from_numpy(run_np(ort, "embed", {"input_ids": ids[:, :100]})["inputs_embeds"])
    dec = Decoder(ort, cache, prefill(ort, cache, emb)["logits"], SamplingParams())
    logits = [dec.logits[0].numpy().copy()]
    for t in ids[0, 100:]:
        dec.ids.fill_(int(t))
        dec.step()
        logits.append(dec.logits[0].numpy().copy())
    got, want = np.stack(logits[:-1]), full[99:-1]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    assert cache.length == 140 and cache.capacity == 256


def run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr()


def test_cli_ort_end_to_end(tiny_dir, tiny_onnx, test_image, tmp_path, capsys):
    rc, out = run(["chat", "--model", str(tiny_dir), "--backend", "ort", "--artifacts", str(tiny_onnx),
                   "--image", str(test_image), "--question", "hi", "--max-new-tokens", "4", "--json"], capsys)
    assert rc == 0 and len(json.loads(out.out)["token_ids"]) == 4
    rc, out = run(["generate", "--model", str(tiny_dir), "--backend", "ort", "--artifacts", str(tiny_onnx),
                   "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "c.png"), "--json"], capsys)
    assert rc == 0 and Image.open(tmp_path / "c.png").size == (384, 384)


def test_ort_refusals(tiny_dir, tiny_onnx, test_image, tmp_path, capsys):
    def chat_with(artifacts, model=tiny_dir):
        return run(["chat", "--model", str(model), "--backend", "ort", "--artifacts", str(artifacts),
                    "--image", str(test_image), "--question", "q", "--max-new-tokens", "2"], capsys)

    def broken(how):
        d = tmp_path / how
        shutil.copytree(tiny_onnx, d)
        if how == "no-manifest":
            (d / "manifest.json").unlink()
        elif how == "missing-graph":
            (d / "llm.onnx").unlink()
        elif how == "corrupt-graph":
            (d / "siglip.onnx").write_bytes(b"\x08\x07garbage")
        elif how == "other-version":
            m = json.loads((d / "manifest.json").read_text())
            m["janusflow_trt_version"] = "7.0.0"
            (d / "manifest.json").write_text(json.dumps(m))
        return d

    other = tmp_path / "other_model"
    shutil.copytree(tiny_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["language_config"]["rms_norm_eps"] = 1e-5  # same shapes, different model: must be refused
    (other / "config.json").write_text(json.dumps(cfg))
    cases = [(broken("no-manifest"), tiny_dir, "no manifest.json"),
             (broken("missing-graph"), tiny_dir, "missing"),
             (broken("corrupt-graph"), tiny_dir, "truncated or modified"),
             (broken("other-version"), tiny_dir, "janusflow-trt 7.0.0"),
             (tiny_onnx, other, "another config")]
    for artifacts, model, needle in cases:
        rc, out = chat_with(artifacts, model)
        err = out.err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, (artifacts, err)
    rc, out = run(["chat", "--model", str(tiny_dir), "--backend", "ort", "--artifacts", str(tiny_onnx),
                   "--image", str(test_image), "--question", "q " * 5000], capsys)
    assert rc == 2 and "context" in out.err
