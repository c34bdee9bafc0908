"""janusflow_trt.Pipeline: equals the CLI, loads once, bounded buffers, bucketed KV growth, lean imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from janusflow_trt import Pipeline
from janusflow_trt.api import final_images
from janusflow_trt.cli import main
from janusflow_trt.errors import InputError
from janusflow_trt.runtime.backends import OrtBackend, SeamWrapper
from janusflow_trt.runtime.llm import new_cache, positions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe(tiny_dir, tiny_onnx):
    return Pipeline.from_pretrained(tiny_dir, backend="ort", artifacts=tiny_onnx, threads=2)


def cli_json(argv, capsys):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_api_equals_cli(pipe, tiny_dir, tiny_onnx, test_image, tmp_path, capsys):
    common = ["--model", str(tiny_dir), "--backend", "ort", "--artifacts", str(tiny_onnx), "--json"]
    got = cli_json(["chat", *common, "--image", str(test_image), "--question", "What is it?",
                    "--max-new-tokens", "12", "--temperature", "0.8", "--seed", "5"], capsys)
    res = pipe.chat(Image.open(test_image), "What is it?", max_new_tokens=12, temperature=0.8, seed=5)
    assert res.token_ids == got["token_ids"] and res.text == got["text"] and len(res.token_ids) == 12
    pieces = list(pipe.chat_stream(str(test_image), "What is it?", max_new_tokens=12, temperature=0.8, seed=5))
    assert "".join(pieces) == res.text
    arr = np.asarray(Image.open(test_image).convert("RGB"))
    assert pipe.chat(arr, "What is it?", max_new_tokens=12, temperature=0.8, seed=5).token_ids == res.token_ids

    cli_json(["generate", *common, "--prompt", "a red fox", "--steps", "3", "--num-images", "2", "--seed", "9",
              "--save-latents", str(tmp_path / "z.npy"), "--out", str(tmp_path / "f.png")], capsys)
    steps = []
    gen = pipe.generate("a red fox", steps=3, num_images=2, seed=9, callback=lambda i, z: steps.append((i, z.copy())))
    np.testing.assert_array_equal(gen.latents, np.load(tmp_path / "z.npy"))
    assert [i for i, _ in steps] == [0, 1, 2]
    np.testing.assert_array_equal(steps[-1][1], gen.latents)
    for i, im in enumerate(gen.images):
        np.testing.assert_array_equal(np.asarray(im), np.asarray(Image.open(tmp_path / f"f_{i}.png")))


class Loads:
    """Counts the real loaders: checkpoint weights, VAE weights, ONNX Runtime sessions."""

    def __init__(self, monkeypatch):
        import onnxruntime

        from janusflow_trt.janusflow_ref import vae, weights
        from janusflow_trt.runtime import torch_backend

        self.n = {"model": 0, "vae": 0, "session": 0}
        # each loader wherever it was imported by name (the reference's modules, the torch backend's)
        for mod, name, key in ((weights, "load_model", "model"), (vae, "load_vae", "vae"),
                               (torch_backend, "load_model", "model"), (torch_backend, "load_vae", "vae")):
            monkeypatch.setattr(mod, name, self._counted(getattr(mod, name), key))
        monkeypatch.setattr(onnxruntime, "InferenceSession",
                            self._counted(onnxruntime.InferenceSession, "session"))

    def _counted(self, fn, key):
        def wrapper(*a, **k):
            self.n[key] += 1
            return fn(*a, **k)
        return wrapper


@pytest.mark.parametrize("backend", ["ort", "torch-fast", "torch"])
def test_warm_pipeline_does_not_reload(backend, tiny_dir, tiny_onnx, test_image, monkeypatch):
    loads = Loads(monkeypatch)
    p = Pipeline.from_pretrained(tiny_dir, backend=backend, artifacts=tiny_onnx, threads=2)

    def use():
        p.chat(test_image, "hi", max_new_tokens=3)
        p.generate("a cat", steps=1)

    use()
    first = dict(loads.n)
    # ort: siglip, embed, llm (also running the Euler step's llm_gen view), gen_enc, gen_dec, vae_dec
    assert first == ({"model": 0, "vae": 0, "session": 6} if backend == "ort"
                     else {"model": 1, "vae": 1, "session": 0}), first
    use()
    use()
    assert loads.n == first


def test_output_buffers_bounded_over_50_prompt_lengths(tiny_dir, tiny_onnx, tiny_model):
    ort = OrtBackend(tiny_onnx, tiny_model.cfg, threads=2)
    rng = np.random.default_rng(0)
    h = tiny_model.cfg.hidden
    kept = {}
    per_call = 0
    for n in range(20, 70):  # 50 distinct prompt lengths
        emb = torch.from_numpy((rng.standard_normal((1, n, h)) * 0.5).astype(np.float32))
        out = ort.run("llm", {**_llm_feeds(ort, tiny_model.cfg, emb)})
        per_call = max(per_call, sum(a.nbytes for a in out.values()))
        if n in (20, 69):
            kept[n] = (emb, {k: v.clone() for k, v in out.items()})
    few = 8  # "a few" shape sets per graph, whatever the number of prompt lengths seen
    assert len(ort.buffers.pool["llm"]) <= few
    assert ort.buffers.nbytes() <= 2 * few * per_call
    for emb, want in kept.values():  # an evicted shape is recomputed into fresh buffers, correctly
        got = ort.run("llm", _llm_feeds(ort, tiny_model.cfg, emb))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def _llm_feeds(backend, cfg, emb):
    cache = new_cache(backend, cfg, 1, 0)
    n = emb.shape[1]
    return {"inputs_embeds": emb, "attention_mask": cache.mask(torch.ones((1, n), dtype=torch.int64)),
            "position_ids": positions(0, 1, n, backend.device), **cache.feeds()}


class Spy(SeamWrapper):
    """Records the KV slots each LLM call attends over (attention_mask is [B, capacity + new])."""

    def __init__(self, backend):
        super().__init__(backend)
        self.b, self.widths = backend, []

    def run(self, graph, feeds):
        if graph == "llm":
            self.widths.append((feeds["attention_mask"].shape[1], feeds["inputs_embeds"].shape[1]))
        return self.b.run(graph, feeds)


def test_chat_kv_cache_grows_with_the_answer(pipe, test_image):
    """The cache starts at the prompt's bucket and grows as the answer does: no decode step attends to
    more than one bucket (128) of empty slots, whatever max_new_tokens says."""
    spy = Spy(pipe.engine.backend)
    pipe.engine.backend = spy
    try:
        res = pipe.chat(test_image, "Describe it.", max_new_tokens=300)
    finally:
        pipe.engine.backend = spy.b
    assert len(res.token_ids) == 300, "a random model should not stop early here"
    (prefill_w, prompt), *decode = spy.widths
    assert prompt == res.prompt_tokens and prefill_w - prompt - prompt < 128
    for i, (w, new) in enumerate(decode):
        filled = prompt + i  # slots written before this step
        capacity = w - new
        assert filled < capacity <= filled + 128, (i, capacity, filled)
    assert decode[-1][0] - 1 > decode[0][0] - 1, "the cache must have grown"


def test_ort_path_imports_no_model_code(tiny_dir, tiny_onnx, test_image):
    code = f"""
import sys
from janusflow_trt import Pipeline
p = Pipeline.from_pretrained({str(tiny_dir)!r}, backend="ort", artifacts={str(tiny_onnx)!r}, threads=1)
p.chat({str(test_image)!r}, "hi", max_new_tokens=2)
p.generate("a cat", steps=1)
bad = [m for m in sys.modules if m in ("janusflow_trt.janusflow_ref.model", "transformers.modeling_utils", "diffusers")
       or m.startswith("janusflow_trt.benchmarks") or (m.startswith("transformers.models.") and ".modeling_" in m
                                         and not m.startswith("transformers.models.auto."))]
print(sorted(bad))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_api_refusals(pipe, tiny_dir, test_image):
    from janusflow_trt.errors import InputError

    with pytest.raises(InputError, match="precision"):
        Pipeline.from_pretrained(tiny_dir, backend="ort", precision="int4")
    with pytest.raises(InputError, match="backend"):
        Pipeline.from_pretrained(tiny_dir, backend="onnx")
    with pytest.raises(InputError, match="image"):
        pipe.chat(np.zeros((4, 4), np.float32), "q")
    with pytest.raises(InputError, match="empty"):
        next(pipe.chat_stream(test_image, "  "))
    with pytest.raises(InputError, match="steps"):
        pipe.generate("a cat", steps=0)


def test_final_images_refuse_non_finite_latents_and_pixels():
    """The one end-of-generation check (Pipeline.generate and the server's batched images): non-finite
    latents or VAE pixels are one InputError line each; finite ones decode to 384x384 images."""
    z = np.zeros((2, 4, 48, 48), np.float32)
    images = final_images(z, 30, lambda t: torch.zeros((t.shape[0], 3, 384, 384)))
    assert [im.size for im in images] == [(384, 384)] * 2
    with pytest.raises(InputError, match="non-finite pixels"):
        final_images(z, 30, lambda t: torch.full((t.shape[0], 3, 384, 384), float("nan")))
    z[1, 0, 0, 0] = np.inf
    with pytest.raises(InputError, match="latents became non-finite"):
        final_images(z, 30, lambda t: torch.zeros((t.shape[0], 3, 384, 384)))
