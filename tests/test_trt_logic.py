"""Everything around the TensorRT engines that is plain logic, tested without TensorRT or a GPU:
the operator list and its parser, profiles derived from the specs, the buffer budget (checked against
numbers computed here from config.json), engine-manifest refusals, `build --dry-run`, and the one-line
exit 2 where TensorRT or a GPU is missing. Nothing here stands in for TensorRT or CUDA behaviour."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from janusflow_trt.cli import main
from janusflow_trt.errors import CheckpointError
from janusflow_trt.export.engine_manifest import (
    EngineMismatchError,
    Target,
    build_engine_manifest,
    check_engine_files,
    check_engine_manifest,
    engine_entry,
    read_engine_manifest,
    source_graph,
    write_json_atomic,
)
from janusflow_trt.export.specs import build_specs, dummy_inputs
from janusflow_trt.export.trt_ops import operator_doc, parse_operators_md, unsupported_ops
from janusflow_trt.export.trt_plan import Profile, budget, engine_profiles, plan_buffers
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.runtime.trt_backend import pick_profile


def _has_tensorrt() -> bool:
    try:
        import tensorrt

        return hasattr(tensorrt, "Builder")
    except ImportError:
        return False


# -- the operator list -----------------------------------------------------------------------------
def test_operator_doc_is_onnx_tensorrt_at_a_recorded_commit():
    doc = operator_doc()
    assert "github.com/onnx/onnx-tensorrt/blob/96e781103cfc4adf4a6bb557e94bac8e693f6f4c/docs/operators.md" in doc.source
    assert (doc.tensorrt, doc.opset_min, doc.opset_max) == ("10.0", 9, 20)
    # rows read from the table by eye: Y rows and N rows
    assert {"MatMul", "Softmax", "LayerNormalization", "Gelu", "DequantizeLinear", "Where"} <= doc.supported
    assert {"BitShift", "AffineGrid", "HannWindow", "DFT", "Unique"} <= doc.unsupported
    assert not doc.supported & doc.unsupported and len(doc.supported) > 120


def test_parser_reads_rows_and_range():
    md = ("<!-- Source: https://example/x@abc -->\nTensorRT 9.9 supports operators in the inclusive range of "
          "opset 7 to opset 17.\n| Operator | Supported | Types |\n|---|---|---|\n| Abs | Y | FP32 |\n"
          "| Foo          | N          |\n| Bar | Y | FP32 | restriction with | pipes |\n")
    d = parse_operators_md(md)
    assert (d.source, d.tensorrt, d.opset_min, d.opset_max) == ("https://example/x@abc", "9.9", 7, 17)
    assert d.supported == {"Abs", "Bar"} and d.unsupported == {"Foo"}
    with pytest.raises(ValueError):
        parse_operators_md("| Abs | Y |")


def test_every_exported_graph_is_in_tensorrt_support(tiny_onnx):
    doc = operator_doc()
    for path in sorted(tiny_onnx.glob("*.onnx")):
        m = onnx.load(str(path), load_external_data=False)
        assert unsupported_ops(m) == [], path.name
        opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        assert doc.opset_min <= opset <= doc.opset_max, (path.name, opset)


# -- profiles and buffers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cfg(tiny_dir):
    return load_config(tiny_dir)


@pytest.fixture(scope="module")
def raw(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())


def test_llm_profiles_prefill_and_decode(cfg, raw):
    specs = build_specs(cfg)
    lm = raw["language_config"]
    e = raw["vision_gen_enc_config"]["params"]
    grid = (48 + 2 * e["padding"] - e["kernel_size"]) // e["stride"] + 1
    ctx = lm["max_position_embeddings"]
    prefill, decode = engine_profiles(specs, "llm")
    assert (prefill.name, decode.name) == ("prefill", "decode")
    lo, opt, hi = prefill.shapes["inputs_embeds"]
    assert (lo[1], opt[1], hi[1]) == (2, 1 + grid * grid, ctx)  # opt: one Euler step's 1 + G tokens
    assert {s[1] for s in decode.shapes["inputs_embeds"]} == {1}
    for p in (prefill, decode):
        for i in range(3):  # attention mask length = cache capacity + new tokens, at min, opt and max
            assert p.shapes["attention_mask"][i][1] == p.shapes["past_key_values.0.key"][i][2] + \
                p.shapes["inputs_embeds"][i][1]
        assert p.shapes["past_key_values.0.key"][2] == (16, lm["num_key_value_heads"], ctx,
                                                        lm["hidden_size"] // lm["num_attention_heads"])


def test_llm_gen_profile_is_the_euler_step_exactly(cfg):
    specs = build_specs(cfg)
    (p,) = engine_profiles(specs, "llm_gen")
    lo, opt, hi = p.shapes["inputs_embeds"]
    assert lo[1] == opt[1] == hi[1] == cfg.num_gen_tokens + 1  # t_emb + G latent tokens, from the config
    assert (lo[0], hi[0]) == (1, 16) and pick_profile("llm_gen", {"inputs_embeds": opt}) == "euler"


def test_generation_profiles_are_cfg_batches(cfg):
    specs = build_specs(cfg)
    for g in ("gen_enc", "gen_dec"):
        (p,) = engine_profiles(specs, g)
        lo, _, hi = p.shapes["z"]
        assert lo[0] == 2 and hi[0] % 2 == 0


def test_dummy_inputs_fall_inside_the_picked_profile(cfg):
    specs = build_specs(cfg)
    for name, spec in specs.items():
        profiles = {p.name: p for p in engine_profiles(specs, name)}
        step_tokens = cfg.num_gen_tokens + 1  # an Euler step's new tokens: the only S llm_gen runs at
        for sizes in {"llm": [{}, {"S": 1}], "llm_gen": [{"S": step_tokens}]}.get(name, [{}]):
            feeds = dummy_inputs(spec, **sizes)
            p = profiles[pick_profile(name, {k: v.shape for k, v in feeds.items()})]
            for k, v in feeds.items():
                lo, _, hi = p.shapes[k]
                assert all(a <= n <= b for a, n, b in zip(lo, v.shape, hi, strict=True)), (name, sizes, k)


def test_buffer_budget_matches_config_arithmetic(cfg, raw):
    lm = raw["language_config"]
    L, kvh, ctx = lm["num_hidden_layers"], lm["num_key_value_heads"], lm["max_position_embeddings"]
    h = lm["hidden_size"]
    hd = h // lm["num_attention_heads"]
    kv_bytes = 2 * L * 16 * kvh * ctx * hd * 4  # K and V per layer, 16 rows, full capacity, float32
    e = raw["vision_gen_enc_config"]["params"]
    grid = (48 + 2 * e["padding"] - e["kernel_size"]) // e["stride"] + 1
    c = e["block_out_channels"][0]
    lat = 16 * 4 * 48 * 48 * 4
    gen_dec = 16 * (1 + grid**2) * h * 4 + 16 * c * grid * grid * 4 + 16 * h * 4 + lat + 4 + 4 + 2 * lat
    specs = build_specs(cfg)
    bufs = [b for g in specs for b in plan_buffers(specs[g], engine_profiles(specs, g))]
    got = budget(bufs)
    assert got["kv_cache"] == kv_bytes and got["gen_dec"] == gen_dec
    assert got["total"] == sum(v for k, v in got.items() if k != "total")
    half = plan_buffers(specs["llm"], engine_profiles(specs, "llm"),
                        {f"past_key_values.{i}.{k}": "float16" for i in range(L) for k in ("key", "value")})
    assert budget(half)["kv_cache"] == kv_bytes // 2  # an FP16 graph's declared dtypes are what count


# -- engine manifest refusals ----------------------------------------------------------------------
HERE = Target("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.fixture
def engines(cfg, tmp_path):
    specs = build_specs(cfg)
    entries = {}
    for g in ("llm", "gen_dec"):
        (tmp_path / f"{g}.plan").write_bytes(f"engine bytes of {g}".encode())
        entries[g] = engine_entry(f"{g}.plan", tmp_path, {"file": f"{g}.onnx", "sha256": f"sha-{g}"},
                                  engine_profiles(specs, g), 1 << 20, 1.0)
    m = build_engine_manifest(HERE, "fp16", cfg.sha256, tmp_path, entries)
    write_json_atomic(tmp_path / "engines.json", m)
    wanted = {g: engine_profiles(specs, g) for g in entries}
    return tmp_path, read_engine_manifest(tmp_path), wanted


def test_manifest_accepts_its_own_machine(cfg, engines):
    d, m, wanted = engines
    check_engine_manifest(m, HERE, cfg.sha256, "fp16", wanted, {"llm": "sha-llm", "gen_dec": "sha-gen_dec"})
    check_engine_files(d, m, list(wanted))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(tensorrt_version="10.8.0.43"), "built with TensorRT 10.8.0.43, this is TensorRT 10.13"),
    (lambda m: m["gpu"].update(compute_capability="8.9"), "sm 8.9"),
    (lambda m: m["gpu"].update(name="NVIDIA L4"), "built for NVIDIA L4"),
    (lambda m: m.update(config_sha256="0" * 64), "another checkpoint config"),
    (lambda m: m.update(precision="int8"), "engines are int8, fp16 was asked for"),
    (lambda m: m["engines"]["llm"]["source"].update(sha256="other"), "engine llm was built from another ONNX"),
    (lambda m: m["engines"].pop("gen_dec"), "no engine for graph 'gen_dec'"),
    (lambda m: m["engines"]["llm"]["profiles"].pop(1), "profile 'decode'"),
])
def test_manifest_refusals(cfg, engines, change, message):
    _, m, wanted = engines
    change(m)
    with pytest.raises(EngineMismatchError, match=message.replace("(", r"\(")):
        check_engine_manifest(m, HERE, cfg.sha256, "fp16", wanted, {"llm": "sha-llm", "gen_dec": "sha-gen_dec"})


def test_manifest_refuses_a_narrower_profile(cfg, engines):
    """An engine built when the context was 1024 cannot serve this version's 4096-token range."""
    _, m, wanted = engines
    p = Profile.from_json(m["engines"]["llm"]["profiles"][0])
    lo, opt, hi = p.shapes["past_key_values.0.key"]
    p.shapes["past_key_values.0.key"] = (lo, opt, (*hi[:2], 1024, hi[3]))
    m["engines"]["llm"]["profiles"][0] = p.to_json()
    with pytest.raises(EngineMismatchError, match="profile 'prefill' does not cover .* past_key_values.0.key"):
        check_engine_manifest(m, HERE, cfg.sha256, "fp16", wanted, None)


def test_modified_engine_file_refused(engines):
    d, m, wanted = engines
    (d / "llm.plan").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        check_engine_files(d, m, list(wanted))


def test_source_graph_lookup(tiny_onnx):
    exp = json.loads((tiny_onnx / "manifest.json").read_text())
    assert source_graph(exp, "llm", "fp32")["file"] == "llm.onnx"
    with pytest.raises(CheckpointError, match="graph llm was not exported at precision fp16"):
        source_graph(exp, "llm", "fp16")


# -- the CLI ---------------------------------------------------------------------------------------
def test_build_dry_run_prints_plan_and_budget(tiny_onnx, raw, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["build", "--artifacts", str(tiny_onnx), "--precision", "fp32", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    lm = raw["language_config"]
    kv = 2 * lm["num_hidden_layers"] * 16 * lm["num_key_value_heads"] * lm["max_position_embeddings"] * \
        (lm["hidden_size"] // lm["num_attention_heads"]) * 4
    for g in ("siglip", "embed", "llm", "gen_enc", "gen_dec", "vae_dec"):
        assert f"{g}: source {g}.onnx" in text
    assert "profile prefill:" in text and "profile decode:" in text and f"({kv} bytes)" in text
    assert not out.exists()
    assert main(["build", "--artifacts", str(tiny_onnx), "--precision", "fp16", "--out", str(out), "--dry-run",
                 "--graphs", "llm"]) == 0
    assert "llm: source MISSING (export with --precision fp16)" in capsys.readouterr().out


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed here: the missing-TensorRT path cannot run")
def test_build_without_tensorrt_is_one_line_exit_2(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["build", "--artifacts", str(tiny_onnx), "--precision", "fp16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "needs TensorRT" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(_has_tensorrt() or torch.cuda.is_available(), reason="a GPU stack is present here")
@pytest.mark.parametrize("backend, message", [("trt", "needs TensorRT"), ("torch-cuda", "needs an NVIDIA GPU")])
def test_gpu_backends_without_gpu_are_one_line_exit_2(tiny_dir, tiny_onnx, test_image, capsys, backend, message):
    args = ["chat", "--model", str(tiny_dir), "--backend", backend, "--artifacts", str(tiny_onnx), "--image",
            str(test_image), "--question", "What?", "--max-new-tokens", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present here")
def test_gpu_check_without_gpu_is_one_line_exit_2(tmp_path, capsys):
    assert main(["gpu-check", "--out", str(tmp_path / "r")]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_build_refuses_a_foreign_out_dir(tiny_onnx, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["build", "--artifacts", str(tiny_onnx), "--precision", "fp32", "--out", str(foreign)]) == 2
    assert "is not an engines directory" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_num_images_beyond_the_specs_batch_limit_is_refused(tiny_dir, tiny_onnx, tmp_path, capsys):
    args = ["generate", "--model", str(tiny_dir), "--backend", "ort", "--artifacts", str(tiny_onnx), "--prompt",
            "a fox", "--steps", "1", "--out", str(tmp_path / "x.png")]
    assert main([*args, "--num-images", "9"]) == 2  # gen_enc takes 16 CFG rows = 8 images
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "[1, 8]" in err and "batch limit" in err
    assert list(tmp_path.iterdir()) == []


# -- the backend factory hands TensorRT the precision asked for ----------------------------------------
def test_trt_backend_refuses_engines_of_another_precision(cfg, engines, tiny_dir, monkeypatch):
    """`--backend trt --precision fp32` over fp16 engines (and fp16 over fp32 ones) is refused in one line:
    the registry -> make_backend -> TrtBackend path passes the precision to the engine-manifest check.
    TensorRT and CUDA are faked for the checks that run before any engine is loaded."""
    import types

    from janusflow_trt import Pipeline
    from janusflow_trt.runtime import trt_backend

    d, m, _ = engines  # engines.json says fp16
    fake = types.SimpleNamespace(__version__=HERE.tensorrt_version, Builder=object)
    monkeypatch.setattr(trt_backend, "require_tensorrt", lambda what: fake)
    monkeypatch.setattr(trt_backend, "require_cuda", lambda what: None)
    monkeypatch.setattr(trt_backend, "target_here", lambda version: HERE)
    monkeypatch.setattr(trt_backend, "export_sources", lambda m: None)
    monkeypatch.setattr(trt_backend, "engine_profiles", lambda specs, g: [])
    monkeypatch.setattr(trt_backend, "check_engine_files", lambda *a: None)
    m["config_sha256"] = cfg.sha256
    for asked, have in (("fp32", "fp16"), ("fp16", "fp32")):
        m["precision"] = have
        write_json_atomic(d / "engines.json", m)
        with pytest.raises(EngineMismatchError, match=f"engines are {have}, {asked} was asked for") as e:
            Pipeline.from_pretrained(tiny_dir, backend="trt", artifacts=d, precision=asked)
        assert len(str(e.value).splitlines()) == 1


def test_euler_step_reads_fixed_buffers(tiny_dir, tiny_onnx, processor, cfg):
    """What lets a GPU backend capture the Euler step as one CUDA graph: every input of every graph call
    in a step is either one of the request's fixed buffers (the same address at every step) or an output
    of an earlier call in the same step; checked on the real step function over ONNX Runtime."""
    import torch

    from janusflow_trt.runtime import text2img
    from janusflow_trt.runtime.backends import OrtBackend, SeamWrapper
    from janusflow_trt.runtime.euler_step import euler_loop

    class Addresses(SeamWrapper):
        def __init__(self, inner):
            super().__init__(inner)
            self.steps: list[list[tuple[str, str, int]]] = []
            self.produced: set[int] = set()

        def run(self, graph, feeds):
            if graph == "gen_enc":  # a step starts
                self.steps.append([])
                self.produced = set()
            if not self.steps:  # the prefix prefill, before the loop
                return self.inner.run(graph, feeds)
            for name, t in feeds.items():
                if t.data_ptr() not in self.produced:
                    self.steps[-1].append((graph, name, t.data_ptr()))
            out = self.inner.run(graph, feeds)
            self.produced |= {t.data_ptr() for t in out.values()}
            return out

    seam = Addresses(OrtBackend(tiny_onnx, cfg))
    cache = text2img.prefill_prefix(seam, cfg, processor, "a red fox", 2)
    for _ in euler_loop(seam, cache, torch.zeros((2, 4, 48, 48)), 4, 2.0):
        pass
    assert len(seam.steps) == 4
    inputs = {(g, n) for g, n, _ in seam.steps[0]}
    assert {("gen_enc", "z"), ("gen_enc", "t"), ("llm_gen", "attention_mask"), ("llm_gen", "position_ids"),
            ("gen_dec", "z"), ("gen_dec", "cfg_weight"), ("gen_dec", "dt")} <= inputs
    assert ("llm_gen", "inputs_embeds") not in inputs and ("gen_dec", "hidden") not in inputs  # wired in-step
    assert all(s == seam.steps[0] for s in seam.steps[1:])  # the same buffers, the same addresses


def test_gpu_check_report_from_a_real_pytest_run(tmp_path):
    """Runs the -m gpu tests here for real (they skip without a GPU) and summarises pytest's own JUnit XML."""
    import subprocess
    import sys
    from pathlib import Path

    from janusflow_trt.runtime.gpu_check import TESTS, summarise_junit, write_report

    xml = tmp_path / "gpu.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", str(TESTS),
                    f"--junitxml={xml}", "-k", "torch_cuda"], cwd=Path(TESTS).parent.parent, check=False,
                   capture_output=True)
    rows = summarise_junit(xml)
    assert [r["test"] for r in rows] == ["test_torch_cuda_euler_step_capture_equals_eager"]
    want = "passed" if torch.cuda.is_available() else "skipped"
    assert rows[0]["outcome"] == want
    if want == "skipped":
        assert "no CUDA GPU" in rows[0]["message"]
    write_report(rows, tmp_path)
    assert json.loads((tmp_path / "gpu.json").read_text()) == rows
    assert "| test_torch_cuda_euler_step_capture_equals_eager | skipped |" in (tmp_path / "gpu.md").read_text() or \
        want == "passed"
