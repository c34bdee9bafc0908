"""ONNX export + verification on a tiny random checkpoint (all graphs exported once per session)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from janusflow_trt.errors import CheckpointError, JanusFlowError
from janusflow_trt.export import torch_to_onnx
from janusflow_trt.export.manifest import file_record, sha256_file
from janusflow_trt.export.onnx_io import ort_session
from janusflow_trt.export.specs import GRAPH_NAMES, build_specs, compare, dummy_inputs, trt_profiles
from janusflow_trt.export.torch_to_onnx import ExportError, check_ops
from janusflow_trt.export.verify import grow_cache, llm_feeds, verify
from janusflow_trt.export_commands import register
from janusflow_trt.export_job import export_graphs
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.janusflow_ref.weights import load_model


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> Path:
    return tiny_dir


@pytest.fixture(scope="session")
def exported(tiny_onnx) -> Path:
    return tiny_onnx


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# -- export + verify ---------------------------------------------------------------------------------
def test_export_and_verify_pass(tiny, exported, capsys):
    report = verify(tiny, exported)
    assert report.ok, report.failure_lines()
    cases = {(r["graph"], r["case"]) for r in report.rows}
    assert {g for g, _ in cases} == set(GRAPH_NAMES)
    for case in ("chat past=0", "decode past=1", "decode past=7", "gen step"):
        assert ("llm", case) in cases
    assert "present.1.value" in capsys.readouterr().out  # the table is printed
    assert cli(["verify", "--model", str(tiny), "--artifacts", str(exported)]) == 0


def test_manifest(tiny, exported):
    m = json.loads((exported / "manifest.json").read_text())
    cfg = load_config(tiny)
    specs = build_specs(cfg)
    assert m["format_version"] == 2 and m["janusflow_trt_version"] == "0.1.0"
    assert m["config_sha256"] == cfg.sha256 and m["config"] == json.loads((tiny / "config.json").read_text())
    assert {"torch", "onnx", "onnxruntime", "transformers", "diffusers"} <= set(m["versions"])
    assert list(m["graphs"]) == list(GRAPH_NAMES)
    for name, g in m["graphs"].items():
        assert sha256_file(exported / g["file"]) == g["sha256"]
        assert (exported / g["file"]).stat().st_size == g["size"]
        model = onnx.load(str(exported / g["file"]))
        assert [o.version for o in model.opset_import if o.domain == ""] == [g["opset"]]
        assert g["opset"] == 18 and g["exporter"] == "dynamo" and g["seconds"] > 0 and g["peak_rss_mb"] > 0
        assert [t["name"] for t in g["inputs"]] == specs[name].input_names
        assert [t["name"] for t in g["outputs"]] == specs[name].output_names
        model = onnx.load(str(exported / g["file"]))
        assert [i.name for i in model.graph.input] == specs[name].input_names
        assert [o.name for o in model.graph.output] == specs[name].output_names
        for vi, t in zip(model.graph.input, specs[name].inputs, strict=True):
            dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            assert dims == list(t.shape), (name, t.name)
    llm = m["graphs"]["llm"]
    n_layers = cfg.llm.num_hidden_layers
    assert [t["name"] for t in llm["inputs"]][3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert len(llm["outputs"]) == 2 + 2 * n_layers and llm["outputs"][-1]["name"] == f"present.{n_layers - 1}.value"
    mask = llm["inputs"][1]
    assert mask["shape"] == ["B", "M"] and mask["ranges"]["M"]["max"] == 2 * cfg.max_context
    assert m["graphs"]["gen_dec"]["inputs"][0]["ranges"]["B"] == {"min": 2, "opt": 2, "max": 16}


def test_specs_profiles_and_dummies(tiny):
    specs = build_specs(load_config(tiny))
    for spec in specs.values():
        for name, (lo, opt, hi) in trt_profiles(spec).items():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), name
        for t in spec.inputs:
            assert all(s >= 2 for s, d in zip(spec.shape(t), t.shape, strict=True) if isinstance(d, str))
    p = trt_profiles(specs["llm"])
    for w in range(3):  # mask length = C + S in every profile shape
        assert p["attention_mask"][w][1] == p["past_key_values.0.key"][w][2] + p["inputs_embeds"][w][1]
    d = dummy_inputs(specs["llm"])
    assert set(np.unique(d["attention_mask"])) == {0, 1}
    d = dummy_inputs(specs["gen_enc"])
    assert ((0 <= d["t"]) & (d["t"] < 1000)).all() and d["z"].shape[0] % 2 == 0


# -- KV cache path vs the HF LlamaModel full forward ---------------------------------------------------
@pytest.fixture(scope="module")
def hf(tiny):
    return load_model(tiny).language_model


def _hf_forward(lm, embeds: np.ndarray, mask: np.ndarray):
    with torch.no_grad():
        out = lm.model(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                       use_cache=True)
        logits = lm.lm_head(out.last_hidden_state[:, -1]).numpy()
    cache = getattr(out, "cache", None) or out.past_key_values
    keys = [(layer.keys.numpy(), layer.values.numpy()) for layer in cache.layers]
    return out.last_hidden_state.numpy(), logits, keys


def _assert_close(spec, name, got, ref):
    tol = next(t.tol for t in spec.outputs if t.name == name)
    r = compare(got, ref, tol)
    assert r["ok"], (name, r)


@pytest.mark.parametrize("past", [0, 1, 7])
def test_kv_cache_past_lengths_vs_hf(tiny, exported, hf, past):
    cfg = load_config(tiny)
    spec = build_specs(cfg)["llm"]
    sess = ort_session(exported / "llm.onnx")
    rng = np.random.default_rng(past)
    new = 3
    embeds = rng.standard_normal((2, past + new, cfg.hidden)).astype(np.float32)
    ones = np.ones(embeds.shape[:2], np.int64)
    names = spec.output_names
    if past == 0:  # a fully masked capacity-1 buffer
        feeds = llm_feeds(spec, embeds, ones, None, None)
    else:
        pre = dict(zip(names, sess.run(names, llm_feeds(spec, embeds[:, :past], ones[:, :past], None, None)),
                       strict=True))
        cache, valid = grow_cache(spec, pre, ones[:, :past], 2)  # two masked garbage slots
        feeds = llm_feeds(spec, embeds[:, past:], ones[:, past:], cache, valid, past)
    got = dict(zip(names, sess.run(names, feeds), strict=True))
    hidden, logits, kv = _hf_forward(hf, embeds, ones)
    _assert_close(spec, "last_hidden_state", got["last_hidden_state"], hidden[:, past:])
    _assert_close(spec, "logits", got["logits"], logits)
    for i, (k, v) in enumerate(kv):
        _assert_close(spec, f"present.{i}.key", got[f"present.{i}.key"], k[:, :, past:])
        _assert_close(spec, f"present.{i}.value", got[f"present.{i}.value"], v[:, :, past:])


def test_generation_mask_vs_hf(tiny, exported, hf):
    """Cond row sees the whole prompt; the uncond row only its first token; then a 4-token step."""
    cfg = load_config(tiny)
    spec = build_specs(cfg)["llm"]
    sess = ort_session(exported / "llm.onnx")
    plen, new = 6, 4
    embeds = np.random.default_rng(5).standard_normal((2, plen + new, cfg.hidden)).astype(np.float32)
    mask = np.ones((2, plen + new), np.int64)
    mask[1, 1:plen] = 0
    names = spec.output_names
    pre = dict(zip(names, sess.run(names, llm_feeds(spec, embeds[:, :plen], mask[:, :plen], None, None)),
                   strict=True))
    cache, valid = grow_cache(spec, pre, mask[:, :plen], new)
    got = dict(zip(names, sess.run(names, llm_feeds(spec, embeds[:, plen:], mask[:, plen:], cache, valid, plen)),
                   strict=True))
    hidden, logits, kv = _hf_forward(hf, embeds, mask)
    _assert_close(spec, "last_hidden_state", got["last_hidden_state"], hidden[:, plen:])
    _assert_close(spec, "logits", got["logits"], logits)
    _assert_close(spec, "present.0.key", got["present.0.key"], kv[0][0][:, :, plen:])
    # the mask matters: the uncond row differs from what the cond row's context gives
    assert not np.allclose(got["last_hidden_state"][0], got["last_hidden_state"][1], atol=1e-3)


# -- legacy fallback ------------------------------------------------------------------------------------
def test_legacy_fallback(tiny, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(torch_to_onnx, "export_dynamo", broken)
    monkeypatch.setattr(torch_to_onnx, "export_streamed", broken)  # both dynamo paths: the loaded module, then legacy
    out = tmp_path / "legacy"
    m = export_graphs(tiny, None, out, graphs="embed,gen_dec", progress=False)
    for g in ("embed", "gen_dec"):
        assert m["graphs"][g]["exporter"] == "legacy"
        assert "simulated dynamo failure" in m["graphs"][g]["dynamo_error"]
    report = verify(tiny, out, print_table=False)
    assert report.ok, report.failure_lines()


def test_legacy_exporter_on_the_llm_graph(tiny, tmp_path):
    """The TorchScript exporter is the fallback for every graph; the LLM (KV cache, masks) is the one
    most likely to diverge, so it is exported with it and verified against the eager modules."""
    out = tmp_path / "legacy_llm"
    m = export_graphs(tiny, None, out, graphs="llm", progress=False, force_legacy=("llm",))
    assert m["graphs"]["llm"]["exporter"] == "legacy"
    report = verify(tiny, out, print_table=False)
    assert report.ok, report.failure_lines()


# -- refusals and bad inputs -------------------------------------------------------------------------
def test_trt_unsupported_op_fails(tiny):
    spec = build_specs(load_config(tiny))["embed"]
    node = onnx.helper.make_node("BitShift", ["a", "b"], ["c"], direction="LEFT")
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], []))
    with pytest.raises(ExportError, match="graph embed: op BitShift is not supported by the TensorRT"):
        check_ops(model, spec)


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    with pytest.raises(JanusFlowError, match="no config.json"):
        export_graphs(tmp_path / "empty", None, out, progress=False)
    assert not out.exists() and not leftovers(tmp_path, "out")


def test_corrupt_safetensors(tiny, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="corrupt or unreadable safetensors"):
        export_graphs(bad, None, out, graphs="embed", progress=False)
    assert not out.exists() and not leftovers(tmp_path, "out")


def test_unknown_graph_name(tiny, tmp_path):
    with pytest.raises(JanusFlowError, match="unknown graph 'vision'"):
        cli(["export", "--model", str(tiny), "--out", str(tmp_path / "o"), "--graphs", "siglip,vision"])
    assert not (tmp_path / "o").exists()


def test_unwritable_out(tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(JanusFlowError, match="cannot write --out"):
        export_graphs(tiny, None, tmp_path / "file" / "out", graphs="embed", progress=False)


def test_interrupted_export_keeps_previous_out(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_graphs(tiny, None, out, graphs="embed", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = torch_to_onnx.export_one, []

    def interrupted(name, *a, **k):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(name, *a, **k)

    monkeypatch.setattr(torch_to_onnx, "export_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_graphs(tiny, None, out, graphs="embed,gen_enc", progress=False, force=True)
    assert calls == ["embed", "gen_enc"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not leftovers(tmp_path, "out")


def test_verify_refusals(tiny, exported, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(exported, art)
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify(model, tmp_path)
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")  # same config, other bytes
    with pytest.raises(CheckpointError, match="another config"):
        verify(model, art)
    with open(art / "embed.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="graph embed: .* bytes, manifest.json says"):
        verify(tiny, art)
    (art / "siglip.onnx").unlink()
    with pytest.raises(CheckpointError, match="graph siglip: file missing"):
        verify(tiny, art)


def test_verify_detects_parity_failure(tiny, exported, tmp_path, capsys):
    """A graph with a wrong weight (manifest sha updated so only parity can catch it) -> exit 1."""
    art = tmp_path / "art"
    art.mkdir()
    m = json.loads((exported / "manifest.json").read_text())
    m["graphs"] = {"embed": m["graphs"]["embed"]}
    model = onnx.load(str(exported / "embed.onnx"))
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w += 0.01
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    onnx.save(model, str(art / "embed.onnx"))
    m["graphs"]["embed"].update(file_record(art, "embed.onnx"))
    (art / "manifest.json").write_text(json.dumps(m))
    assert cli(["verify", "--model", str(tiny), "--artifacts", str(art)]) == 1
    assert "graph embed" in capsys.readouterr().err


def _dynamo_gelu_graph() -> onnx.ModelProto:
    """x -> exact GELU as torch.onnx (dynamo) writes it: x * (0.5 * (1 + erf(x / sqrt2))), constants as
    initializers and one as a Constant node."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
             helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["half", "a"], ["h"]),
             helper.make_node("Mul", ["x", "h"], ["y"])]
    inits = [numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    g = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_gelu_ort_form_bit_identical_and_fused(tmp_path):
    """The reorder changes no bit (ORT with no graph optimization, inputs across the float range), and ORT's
    optimizer then fuses it: no Erf left. The exported form as it was is not fused (what the pass is for)."""
    import onnxruntime as ort

    from janusflow_trt.export.onnx_graph import gelu_ort_form

    before, after = _dynamo_gelu_graph(), _dynamo_gelu_graph()
    assert gelu_ort_form(after) == 1 and gelu_ort_form(after) == 0  # a second pass finds nothing to do
    onnx.checker.check_model(after, full_check=True)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000) * s for s in (1e-30, 1e-3, 1.0, 10.0, 1e4, 1e30)])
    x = x.astype(np.float32)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y0, y1 = (ort.InferenceSession(m.SerializeToString(), plain).run(None, {"x": x})[0] for m in (before, after))
    assert np.array_equal(y0.view(np.uint32), y1.view(np.uint32))

    def fused_ops(m: onnx.ModelProto, name: str) -> list[str]:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / name)
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(str(tmp_path / name)).graph.node]

    assert "Erf" in fused_ops(before, "before.onnx")
    assert "Erf" not in fused_ops(after, "after.onnx")


def test_exported_gelus_in_ort_form(exported, tmp_path):
    """Every exact GELU of the exported ConvNeXt blocks was rewritten (the manifest's count, and no Erf left
    once ORT has optimized the graph)."""
    import onnxruntime as ort

    m = json.loads((exported / "manifest.json").read_text())
    for name in ("gen_enc", "gen_dec"):
        g = m["graphs"][name]
        erfs = sum(n.op_type == "Erf" for n in onnx.load(str(exported / g["file"])).graph.node)
        assert g["gelu_ort_form"] == erfs > 0, name
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        ort.InferenceSession(str(exported / g["file"]), so, providers=["CPUExecutionProvider"])
        assert not [n for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node if n.op_type == "Erf"], name


def test_grn_exported_as_sum_of_squares(exported):
    """GRN's spatial L2 norm leaves the export as Sqrt(ReduceSum(Pow(x, 2))) over H, W (ORT's fast reduction),
    never as ReduceL2, and the patched form is the L2 norm (against float64 numpy)."""
    from janusflow_trt.export.patches import _spatial_l2

    x = np.random.default_rng(0).standard_normal((2, 5, 7, 33)).astype(np.float32) * 3
    want = np.sqrt((x.astype(np.float64) ** 2).sum(axis=(1, 2), keepdims=True))
    got = _spatial_l2(torch.from_numpy(x)).numpy()
    assert got.shape == (2, 1, 1, 33) and np.allclose(got, want, rtol=1e-6, atol=0)
    for name in ("gen_enc", "gen_dec"):
        g = onnx.load(str(exported / f"{name}.onnx")).graph
        producer = {o: n for n in g.node for o in n.output}
        assert not [n for n in g.node if n.op_type == "ReduceL2"], name
        sqrt_of_sums = [n for n in g.node if n.op_type == "Sqrt" and producer[n.input[0]].op_type == "ReduceSum"]
        squares = [producer[producer[n.input[0]].input[0]] for n in sqrt_of_sums]
        assert squares and all(m.op_type == "Pow" for m in squares), name
