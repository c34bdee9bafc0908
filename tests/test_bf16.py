"""`--backend torch-fast --precision bf16`: the torch backend's graph modules in BF16 on the CPU.

- the CPU check is a function over /proc/cpuinfo's flags (any CPU's flags can be given to it);
- the registry, the API and the CLI accept torch-fast + bf16 and refuse ort + bf16 (bf16 is not an
  exported variant) in one line; on a CPU without BF16 instructions bf16 is refused in one line;
- on the tiny checkpoint, through the runtime's own chat and Euler loops (tests/rt.py): BF16 against
  FP32 within the quality bars (greedy tokens equal, latent cosine >= 0.9995, PSNR >= 45 dB), the KV
  cache in BF16, the Euler carry and update in FP32, the timestep's sin/cos argument in FP32.
- `quality --precision bf16`: the report over torch-fast BF16 vs FP32 (a planted BF16 Euler carry lowers
  its latent cosine), with the FP32 margin at each teacher-forced disagreement and the agreement at the
  positions whose FP32 margin exceeds one BF16 spacing (hand-checked metrics); a precision / backend
  mismatch or a mixed list refused in one line.
- the goldens' chat case (official widths, `make-tiny --size golden`): BF16 against FP32 over the same
  BF16-valued weights, the greedy answer equal up to the first near-tie.
Tests that compute in BF16 are skipped, with the reason, on a CPU without BF16 instructions (emulated
BF16 is refused there, not run).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rt import rt_chat, rt_euler, rt_vae

from janusflow_trt.errors import InputError
from janusflow_trt.export.quality_metrics import bf16_spacing, cosine, psnr, top2_margin
from janusflow_trt.images import to_uint8
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.janusflow_ref.generation import initial_latents
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.janusflow_ref.weights import load_model
from janusflow_trt.runtime import cpu_isa
from janusflow_trt.runtime.cpu_isa import has_bf16, matrix_isa, require_bf16
from janusflow_trt.runtime.registry import check_request

ZEN5 = ("fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni avx_vnni")  # this CI machine's kind (no AMX)
SPR = "avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_int8 amx_tile"  # Sapphire Rapids
SKX = "sse4_2 avx2 avx512f avx512bw avx512_vnni"  # Cascade Lake: VNNI, no BF16
needs_bf16 = pytest.mark.skipif(not has_bf16(cpu_isa.cpu_flags()),
                                reason="this CPU has no AVX-512 BF16 / AMX: bf16 is refused here")
STEPS = 6  # Euler steps of the tiny comparison (the quality report runs 30)


# -- the CPU check -------------------------------------------------------------------------------

def test_bf16_flags():
    assert has_bf16(ZEN5) and has_bf16(SPR) and not has_bf16(SKX) and not has_bf16("")
    assert not has_bf16("avx512_bf16x")  # whole flags, not substrings
    assert matrix_isa(SPR)["amx_bf16"] and not matrix_isa(ZEN5)["amx_bf16"]
    assert matrix_isa(SKX) == {**dict.fromkeys(cpu_isa.MATRIX_ISA, False), "avx512_vnni": True, "avx512f": True,
                               "avx2": True}
    require_bf16(SPR)
    require_bf16(ZEN5)
    with pytest.raises(InputError, match="needs a CPU with AVX-512 BF16 or AMX") as e:
        require_bf16(SKX)
    assert "\n" not in str(e.value)


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_isa.cpu_flags(f) == "fpu avx2 avx512_bf16"
    assert cpu_isa.cpu_flags(tmp_path / "absent") == ""


# -- the margin metrics of the chat comparison --------------------------------------------------------

def test_bf16_spacing_is_the_gap_to_the_next_bf16_value():
    """Against torch's own BF16 grid (nextafter), not against the formula."""
    xs = [1.0, 1.5, 2.5, 3.984375, 4.0, 0.3, 17.0, -2.5]
    for x in xs:
        b = torch.tensor(abs(x), dtype=torch.bfloat16)
        gap = float(torch.nextafter(b, torch.tensor(1e4, dtype=torch.bfloat16)).float() - b.float())
        assert bf16_spacing(np.array([x]))[0] == gap, (x, gap)
    assert bf16_spacing(np.array([0.0]))[0] == 0.0


def test_margin_rows_hand_values():
    """Two positions: the first a near-tie (margin 0.01 < spacing 0.015625 at 2.5), the second clear
    (margin 0.5); the picks disagree at the first only."""
    from janusflow_trt.quality import margin_rows

    logits = np.array([[2.5, 2.49, 0.0], [0.0, 1.0, 2.5]])
    np.testing.assert_allclose(top2_margin(logits), [0.01, 1.5])
    r = margin_rows([1, 2], [0, 2], logits, "bf16")
    assert r["decidable"] == 1 and r["decidable_agree"] == 1
    assert [p for p, _ in r["fp32_margin_at_disagreements"]] == [0]
    np.testing.assert_allclose(r["fp32_margin_at_disagreements"][0][1], 0.01)
    r = margin_rows([0, 1], [0, 2], logits, "bf16")  # a clear position disagrees
    assert r["decidable"] == 1 and r["decidable_agree"] == 0
    assert "decidable" not in margin_rows([0, 1], [0, 2], logits, "int8-cpu")  # FP32 logits: no rounding bound


# -- the registry, the API, the CLI -------------------------------------------------------------

def test_registry_bf16_is_a_torch_dtype():
    assert check_request("torch-fast", "bf16", None).name == "torch-fast"
    assert check_request("torch-cuda", "bf16", None).name == "torch-cuda"
    for backend in ("ort", "trt", "torch"):
        with pytest.raises(InputError, match="bf16 .a torch-backend dtype, not exported. runs on torch-fast or "
                                             "torch-cuda") as e:
            check_request(backend, "bf16", "artifacts")
        assert "\n" not in str(e.value)


def test_export_and_ort_do_not_take_bf16(tiny_dir):
    from janusflow_trt.errors import JanusFlowError
    from janusflow_trt.export.variants import parse_precisions
    from janusflow_trt.runtime.backends import OrtBackend

    with pytest.raises(JanusFlowError, match="unknown precision 'bf16'"):
        parse_precisions("fp32,bf16")
    with pytest.raises(InputError, match="not an exported variant"):  # before any manifest is read
        OrtBackend(tiny_dir / "no-export", load_config(tiny_dir), precision="bf16")


def test_cli_refuses_ort_bf16_in_one_line(tiny_dir, test_image, capsys):
    from janusflow_trt.cli import main

    code = main(["chat", "--model", str(tiny_dir), "--image", str(test_image), "--question", "q",
                 "--backend", "ort", "--artifacts", str(tiny_dir), "--precision", "bf16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "runs on torch-fast or torch-cuda" in err, err


def test_bf16_refused_on_a_cpu_without_it(tiny_dir, test_image, monkeypatch, capsys):
    from janusflow_trt import Pipeline
    from janusflow_trt.cli import main

    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: SKX)
    with pytest.raises(InputError, match="needs a CPU with AVX-512 BF16 or AMX"):
        Pipeline.from_pretrained(tiny_dir, backend="torch-fast", precision="bf16")
    code = main(["chat", "--model", str(tiny_dir), "--image", str(test_image), "--question", "q",
                 "--backend", "torch-fast", "--precision", "bf16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "AVX-512 BF16" in err, err


# -- BF16 against FP32 on the tiny checkpoint ------------------------------------------------------

@pytest.fixture(scope="module")
def b32(tiny_dir, tiny_vae):
    from janusflow_trt.runtime.torch_backend import TorchBackend

    return TorchBackend(load_model(tiny_dir), tiny_vae, threads=2)


@pytest.fixture(scope="module")
def b16(tiny_dir, tiny_vae):
    from janusflow_trt.runtime.torch_backend import TorchBackend

    return TorchBackend(load_model(tiny_dir), tiny_vae, threads=2, dtype=torch.bfloat16)


@needs_bf16
def test_bf16_weights_cache_and_fp32_islands(b16, b32, tiny_dir):
    from janusflow_trt.runtime.llm import new_cache

    assert b16.name == "torch-fast" and not b16.capturable and b16.kv_dtype == torch.bfloat16
    assert b32.kv_dtype == torch.float32 and all(not c for c in b32.casts.values())  # FP32: feeds untouched
    cache = new_cache(b16, load_config(tiny_dir), 1, 5)
    assert {b.dtype for b in cache.buffers} == {torch.bfloat16}
    assert b16.modules["llm"].lm.lm_head.weight.dtype == torch.bfloat16
    assert b16.modules["gen_enc"].freqs.dtype == torch.float32  # the sin/cos argument t x freqs in FP32
    assert next(b16.modules["vae_dec"].parameters()).dtype == torch.float32


@needs_bf16
def test_bf16_euler_update_in_fp32(b16, tiny_dir, processor):
    """z_next = z + dt * CFG(v) in FP32 around the BF16 decoder: z kept FP32 (a BF16 z would carry
    ~4e-3 relative rounding into every step)."""
    from janusflow_trt.runtime import text2img
    from janusflow_trt.runtime.euler_step import euler_state, euler_step

    cfg = load_config(tiny_dir)
    cache = text2img.prefill_prefix(b16, cfg, processor, "a red fox", 1)
    z0 = initial_latents(1, seed=3) * (1 + 1e-3 * torch.rand(1, 4, 48, 48))  # values off the BF16 grid
    st = euler_state(b16, cache, z0, 30, 2.0)
    z = st.z.clone()
    _, dec = euler_step(b16, st)
    v = dec["velocity"].float()
    want = z[:1] + st.dt * (2.0 * v[:1] - 1.0 * v[1:])
    assert st.z.dtype == torch.float32
    torch.testing.assert_close(st.z[:1], want, rtol=1e-6, atol=1e-6)


@needs_bf16
def test_bf16_t_emb_close_to_fp32(b16, b32):
    """gen_enc at the largest timesteps (t ~ 1000, where BF16 spacing is 4): the sin/cos argument is FP32."""
    z = initial_latents(2, seed=5)
    t = torch.tensor([999.0, 967.3])
    e16 = b16.run("gen_enc", {"z": z, "t": t})["t_emb"].float().numpy()
    e32 = b32.run("gen_enc", {"z": z, "t": t})["t_emb"].numpy()
    assert cosine(e16, e32) >= 0.9999, cosine(e16, e32)


@needs_bf16
def test_bf16_chat_tokens_equal_fp32(b16, b32, tiny_dir, processor, test_image):
    from PIL import Image

    cfg, img = load_config(tiny_dir), Image.open(test_image).convert("RGB")
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    want = rt_chat(b32, cfg, processor, img, "What is in the picture?", params)
    assert rt_chat(b16, cfg, processor, img, "What is in the picture?", params) == want


@needs_bf16
def test_bf16_latents_and_pixels_vs_fp32(b16, b32, tiny_dir, processor):
    """The same initial latents through both: the quality report's bars (cosine >= 0.9995, PSNR >= 45 dB)."""
    cfg, z0 = load_config(tiny_dir), initial_latents(1, seed=2000).numpy()
    z32 = rt_euler(b32, cfg, processor, "a red fox in autumn leaves", z0, STEPS, 2.0)[-1]
    z16 = rt_euler(b16, cfg, processor, "a red fox in autumn leaves", z0, STEPS, 2.0)[-1]
    assert z16.dtype == np.float32 and np.isfinite(z16).all()
    c = cosine(z16, z32)
    p = psnr(to_uint8(rt_vae(b16, z16))[0], to_uint8(rt_vae(b32, z32))[0])
    assert c >= 0.9995 and p >= 45.0, (c, p)


# -- bench -------------------------------------------------------------------------------------------

@needs_bf16
def test_bench_bf16_columns(tiny_dir, tmp_path, capsys):
    """`bench --precision fp32,bf16`: baseline and torch-fast again in BF16, BF16 columns against the
    BF16 baseline and the BF16 GEMM floor; the CPU's matrix ISA reported."""
    import json
    import math

    from janusflow_trt.cli import main

    out = tmp_path / "bench"
    rc = main(["bench", "--model", str(tiny_dir), "--backends", "baseline,torch-fast", "--precision", "fp32,bf16",
               "--contexts", "16", "--steps", "1", "--quick", "--threads", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "bench.json").read_text())
    assert list(res["backends"]) == ["baseline", "torch-fast", "baseline-bf16", "torch-fast-bf16"]
    assert res["machine"]["matrix_isa"]["avx512_bf16"] and res["floors"]["gemm_bf16_gflops"] > 0
    assert all(math.isclose(x, 1.0) for x in res["backends"]["baseline-bf16"]["speedup_vs_baseline"].values())
    r = res["backends"]["torch-fast-bf16"]
    assert all(math.isfinite(x) and x > 0 for x in r["speedup_vs_baseline"].values())
    assert "Matrix ISA: amx_bf16" in (out / "bench.md").read_text()


def test_bench_bf16_refused_on_a_cpu_without_it(tiny_dir, tmp_path, monkeypatch, capsys):
    from janusflow_trt.cli import main

    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: SKX)
    rc = main(["bench", "--model", str(tiny_dir), "--backends", "torch-fast", "--precision", "bf16",
               "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "AVX-512 BF16" in err, err


# -- the quality report: BF16 vs FP32 on torch-fast, through the runtime's own loops ----------------

def _heldout():
    from janusflow_trt.calibration.data import InputSet, builtin_heldout

    h = builtin_heldout()
    return InputSet(h.prompts[:1], h.pairs[:1])


@pytest.fixture(scope="module")
def bf16_report(tiny_dir, tmp_path_factory):
    from janusflow_trt.quality import run_quality

    return run_quality(tiny_dir, None, ["bf16"], tmp_path_factory.mktemp("q") / "q", heldout=_heldout(), tokens=6,
                       steps=4, progress=False)


@needs_bf16
def test_quality_bf16_report(bf16_report):
    """`quality --precision bf16` without artifacts: both sides on torch-fast, BF16 really run (figures
    below 1 / finite PSNR, the VAE identical because it stays FP32), the issue's targets."""
    from janusflow_trt.quality import TARGETS

    r = bf16_report
    assert r["backend"] == "torch-fast" and r["graphs_compared"] == "the graph modules through each backend's run"
    g, c, graphs = r["t2i"]["bf16"], r["chat"]["bf16"], r["graphs"]["bf16"]
    assert 0.9995 <= g["latent_cosine_min"] < 1.0 and 45.0 <= g["psnr_db_min"] < float("inf"), g
    assert 0.0 <= c["teacher_forced_top1_min"] <= 1.0 and len(c["pairs"][0]["fp32_tokens"]) == 6
    pair = c["pairs"][0]  # one FP32 margin per teacher-forced disagreement; the decidable count within the answer
    assert len(pair["fp32_margin_at_disagreements"]) == round((1 - pair["teacher_forced_top1"]) * 6)
    assert 0 <= pair["decidable_agree"] <= pair["decidable"] <= 6 and c["decidable"] == pair["decidable"]
    assert set(graphs) == {"siglip", "embed", "llm", "gen_enc", "gen_dec", "vae_dec"}
    assert 0.999 <= graphs["gen_dec"]["velocity"]["cosine"] < 1.0 and graphs["llm"]["logits"]["max_abs"] > 0
    assert graphs["vae_dec"]["image"]["max_abs"] == 0.0  # the VAE runs FP32 in the BF16 backend
    assert r["targets"]["bf16"]["thresholds"] == TARGETS["bf16"] == {
        "latent_cosine": 0.9995, "psnr_db": 45.0, "chat_top1_teacher_forced": 0.98}


@needs_bf16
def test_quality_bf16_sees_a_bf16_carry(bf16_report, tiny_dir, tmp_path, monkeypatch):
    """Planted: the Euler carry z fed to gen_dec in BF16 (dropped from the FP32 feeds). The report, run
    through the same backends' loops, shows a lower final-latent cosine and a worse z_next."""
    from janusflow_trt.quality import run_quality
    from janusflow_trt.runtime import torch_backend

    monkeypatch.setitem(torch_backend.FP32_FEEDS, "gen_dec", {"cfg_weight", "dt"})
    bad = run_quality(tiny_dir, None, ["bf16"], tmp_path / "q", heldout=_heldout(), tokens=6, steps=4,
                      progress=False)
    clean = bf16_report
    assert bad["t2i"]["bf16"]["latent_cosine_min"] < clean["t2i"]["bf16"]["latent_cosine_min"]
    assert (bad["graphs"]["bf16"]["gen_dec"]["z_next"]["max_abs"]
            > clean["graphs"]["bf16"]["gen_dec"]["z_next"]["max_abs"])


@pytest.mark.parametrize("extra,needle", [
    (["--precision", "fp16,bf16"], "fp16 runs on ort, bf16 runs on torch-fast"),
    (["--precision", "bf16", "--backend", "ort", "--artifacts", "."], "runs on torch-fast or torch-cuda"),
    (["--precision", "fp16", "--backend", "torch-fast"], "backend torch-fast runs fp32, bf16"),
    (["--precision", "fp16"], "needs an export directory"),
    (["--precision", "bf8"], "unknown precision 'bf8'"),
    (["--precision", "fp32"], "name a precision to compare with fp32"),
])
def test_quality_refusals(tiny_dir, tmp_path, capfd, extra, needle):
    from contract import assert_refused

    assert_refused(["quality", "--model", tiny_dir, "--out", tmp_path / "q", "--quiet", *extra], capfd, [tmp_path],
                   needle)


def test_quality_bf16_refused_on_a_cpu_without_it(tiny_dir, tmp_path, capfd, monkeypatch):
    from contract import assert_refused

    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: SKX)
    assert_refused(["quality", "--model", tiny_dir, "--out", tmp_path / "q", "--precision", "bf16"], capfd,
                   [tmp_path], "AVX-512 BF16")


# -- the goldens' chat case at the official widths ----------------------------------------------------

@pytest.fixture(scope="module")
def golden_ckpt(tmp_path_factory):
    import hashlib
    import json
    from pathlib import Path

    from janusflow_trt.tiny import make_tiny

    golden = Path(__file__).parent / "golden"
    meta = json.loads((golden / "meta.json").read_text())
    out = make_tiny(tmp_path_factory.mktemp("golden") / "ck", size="golden", seed=0)
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == meta["model_safetensors_sha256"]
    return out, golden, meta


@pytest.mark.slow  # ~40 s on the 2-core machine: the official widths' prefill, twice
@needs_bf16
def test_bf16_golden_chat_greedy_until_a_near_tie(golden_ckpt):
    """The goldens' chat case (official widths, 2 LLM layers), 20 greedy tokens. The golden checkpoint's
    weights are FP32 random values; the published JanusFlow checkpoint is BF16, so its FP32 reference is
    FP32 arithmetic over BF16-valued weights, which is what this compares with:
    - that reference still gives the official code's greedy answer (the weights' own BF16 rounding moves
      the logits by up to ~0.05 here, and flips no token of this case);
    - BF16 arithmetic vs that reference: logits within 4 BF16 spacings of the top logit; the top-1 equal at
      every position whose reference margin exceeds one BF16 spacing (most positions: >= 15 of 20); the
      free-running greedy answer equal up to its first divergence, which (if any) is a near-tie: a
      position whose reference margin is under one BF16 spacing."""
    from PIL import Image

    from janusflow_trt.janusflow_ref.processor import Processor
    from janusflow_trt.quality import teacher_forced
    from janusflow_trt.runtime.torch_backend import TorchBackend

    ck, golden, meta = golden_ckpt
    cfg, proc = load_config(ck), Processor(ck)
    img, q, n = Image.open(golden / "input.png").convert("RGB"), meta["question"], meta["max_new_tokens"]
    official = np.load(golden / "chat.npz")["greedy_tokens"].tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=n)

    m32 = load_model(ck)
    m32.to(torch.bfloat16).to(torch.float32)  # the BF16-valued weights, FP32 arithmetic
    b32 = TorchBackend(m32, None, threads=2)
    ref = rt_chat(b32, cfg, proc, img, q, params)
    assert ref == official
    l32 = teacher_forced(b32, cfg, proc, img, q, ref)[1]
    del b32, m32

    b16 = TorchBackend(load_model(ck), None, threads=2, dtype=torch.bfloat16)
    tf, l16 = teacher_forced(b16, cfg, proc, img, q, ref)
    free = rt_chat(b16, cfg, proc, img, q, params)

    spacing, margin = bf16_spacing(l32.max(-1)), top2_margin(l32)
    assert np.abs(l16 - l32).max() <= 4 * spacing.max(), np.abs(l16 - l32).max()
    clear = margin > spacing
    assert clear.sum() >= 15 and all(a == b for a, b, c in zip(tf, ref, clear, strict=True) if c), (tf, ref, margin)
    div = next((i for i, (a, b) in enumerate(zip(free, ref, strict=True)) if a != b), None)
    assert div is None or margin[div] < spacing[div], (div, margin, free, ref)
