"""The llm_gen view (export/views.py): the LLM graph cut to what an Euler step reads, derived from the
llm file of every precision, sharing its external data; and the runtime paths that use it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from janusflow_trt.calibration.data import InputSet, builtin_calibration
from janusflow_trt.calibration.record import Plan
from janusflow_trt.errors import CheckpointError
from janusflow_trt.export import onnx_io
from janusflow_trt.export.manifest import has_view, is_export_dir, listed_files, load_checked, resolve_graph
from janusflow_trt.export.specs import build_specs, dummy_inputs
from janusflow_trt.export_job import export_graphs
from janusflow_trt.janusflow_ref.config import load_config

PLAN = Plan(steps=2, full_runs=1, full_stride=2, early_steps=1)  # calibration for the fp16 variant, kept small


@pytest.fixture(scope="module")
def ext_onnx(tiny_dir, tmp_path_factory):
    """The tiny llm graph at fp32 and fp16, written with external data (as full size is: the tiny
    weights are far below the 2 GB protobuf limit, so the threshold is lowered for this export)."""
    out = tmp_path_factory.mktemp("views") / "onnx"
    mp = pytest.MonkeyPatch()
    mp.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 10_000)
    try:
        cal = builtin_calibration()
        export_graphs(tiny_dir, None, out, graphs="embed,llm,gen_enc,gen_dec", progress=False,
                      precisions="fp32,fp16", calib_inputs=InputSet(cal.prompts[:2], cal.pairs[:1]), calib_plan=PLAN)
    finally:
        mp.undo()
    return out


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def _external_locations(model: onnx.ModelProto) -> set[str]:
    return {kv.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for kv in t.external_data if kv.key == "location"}


def _lm_head(model: onnx.ModelProto, cfg) -> list[str]:
    """Initializers shaped like the LM head ([V, H] or its transpose), wherever the exporter put it."""
    v, h = cfg.llm.vocab_size, cfg.hidden
    return [t.name for t in model.graph.initializer if sorted(t.dims) == sorted([v, h])]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_view_has_no_lm_head_and_reads_the_llm_data_file(ext_onnx, tiny_dir, precision):
    cfg = load_config(tiny_dir)
    m = _manifest(ext_onnx)
    llm_e, gen_e = resolve_graph(m, ext_onnx, "llm", precision), resolve_graph(m, ext_onnx, "llm_gen", precision)
    llm = onnx.load(str(ext_onnx / llm_e["file"]), load_external_data=False)
    gen = onnx.load(str(ext_onnx / gen_e["file"]), load_external_data=False)
    assert [o.name for o in gen.graph.output] == ["last_hidden_state"]
    assert "logits" in [o.name for o in llm.graph.output]
    assert _lm_head(llm, cfg) and not _lm_head(gen, cfg)  # the parent has one, the view none
    assert len(gen.graph.node) < len(llm.graph.node)
    # no weight copy: every big tensor of the view is a reference into the PARENT's data file
    data = llm_e["external_data"]["file"]
    assert _external_locations(gen) == _external_locations(llm) == {data}
    assert gen_e["external_data"]["file"] == data
    assert all(len(t.raw_data) <= 1024 for t in gen.graph.initializer)  # onnx's inline threshold
    # about the parent's proto (pruned; names may differ), never its weights
    assert (ext_onnx / gen_e["file"]).stat().st_size < (ext_onnx / llm_e["file"]).stat().st_size + 4096
    # the references are valid: with its data loaded, each kept initializer equals the parent's
    full_llm = {t.name: onnx.numpy_helper.to_array(t)
                for t in onnx.load(str(ext_onnx / llm_e["file"])).graph.initializer}
    for t in onnx.load(str(ext_onnx / gen_e["file"])).graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), full_llm[t.name])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_view_hidden_state_equals_the_llm_graphs(ext_onnx, tiny_dir, precision):
    from janusflow_trt.export.specs import precision_variant

    m = _manifest(ext_onnx)
    spec = precision_variant(build_specs(load_config(tiny_dir))["llm"], precision)
    feeds = {k: v.astype(t.dtype) for (k, v), t in zip(dummy_inputs(spec, seed=3).items(), spec.inputs, strict=True)}
    llm = onnx_io.ort_session(ext_onnx / resolve_graph(m, ext_onnx, "llm", precision)["file"])
    gen = onnx_io.ort_session(ext_onnx / resolve_graph(m, ext_onnx, "llm_gen", precision)["file"])
    want = llm.run(["last_hidden_state"], feeds)[0]
    got = gen.run(None, feeds)
    assert len(got) == 1
    if precision == "fp32":
        np.testing.assert_array_equal(got[0], want)
    else:  # seen: ORT fuses the final norm with the output Cast once the LM head no longer reads the FP16
        # norm output, so the view skips one FP16 rounding: equal within one FP16 ulp
        np.testing.assert_allclose(got[0], want, rtol=2**-10, atol=0)


def test_manifest_accounts_for_the_view(ext_onnx, tiny_dir, tmp_path):
    cfg = load_config(tiny_dir)
    m = _manifest(ext_onnx)
    assert {"llm_gen.onnx", "llm_gen.fp16.onnx"} <= listed_files(m)
    assert is_export_dir(ext_onnx)  # nothing in the directory the manifest does not list
    assert has_view(m, "llm_gen", "fp32") and has_view(m, "llm_gen", "fp16") and not has_view(m, "llm_gen", "int8")
    d = tmp_path / "copy"
    shutil.copytree(ext_onnx, d)
    f = d / "llm_gen.onnx"
    f.write_bytes(f.read_bytes()[:-1] + b"\0")  # same size, last byte changed: the quick digest sees it
    with pytest.raises(CheckpointError, match="llm_gen.onnx"):
        load_checked(d, cfg)
    with pytest.raises(CheckpointError, match="llm_gen.fp16.onnx"):
        f16 = d / "llm_gen.fp16.onnx"
        f16.unlink()
        resolve_graph(_manifest(d), d, "llm_gen", "fp16")


def test_ort_runs_the_view_on_the_llm_session(ext_onnx, tiny_dir, processor):
    """OrtBackend runs llm_gen on the llm's session with only last_hidden_state bound (one session, one copy
    of the weights); its Euler loop == the same loop with llm_gen run by a session of the view's own file."""
    from rt import rt_euler

    from janusflow_trt.runtime.backends import OrtBackend, SeamWrapper

    class ViewFileSession(SeamWrapper):  # llm_gen by an ORT session of llm_gen.onnx itself
        def __init__(self, inner):
            super().__init__(inner)
            m = _manifest(ext_onnx)
            self.gen = onnx_io.ort_session(ext_onnx / resolve_graph(m, ext_onnx, "llm_gen", "fp32")["file"])

        def run(self, graph, feeds):
            if graph != "llm_gen":
                return self.inner.run(graph, feeds)
            (h,) = self.gen.run(None, {k: v.numpy() for k, v in feeds.items()})
            return {"last_hidden_state": torch.from_numpy(h)}

    cfg = load_config(tiny_dir)
    z = np.random.default_rng(0).standard_normal((2, 4, 48, 48)).astype(np.float32)
    b = OrtBackend(ext_onnx, cfg, threads=2)
    got = rt_euler(b, cfg, processor, "a red fox", z, 3, 2.0)
    assert "llm" in b.sessions and "llm_gen" not in b.sessions  # the weights loaded once
    want = rt_euler(ViewFileSession(OrtBackend(ext_onnx, cfg, threads=2)), cfg, processor, "a red fox", z, 3, 2.0)
    for a, b_ in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b_)  # the same kernels on the same nodes


def test_export_without_views_runs_generation(ext_onnx, tiny_dir, tmp_path):
    """An export written before views (no 'views' in its manifest, no view files) still runs generation."""
    from janusflow_trt.runtime.backends import OrtBackend

    d = tmp_path / "old"
    shutil.copytree(ext_onnx, d)
    m = _manifest(d)
    for e in [m["graphs"]["llm"], *m["graphs"]["llm"]["precisions"].values()]:
        (d / e.pop("views")["llm_gen"]["file"]).unlink()
    (d / "manifest.json").write_text(json.dumps(m))
    from rt import run_np

    b = OrtBackend(d, load_config(tiny_dir), threads=2)
    spec = b.specs["llm_gen"]
    feeds = dummy_inputs(spec, seed=0)
    out = run_np(b, "llm_gen", feeds)
    assert list(out) == ["last_hidden_state"] and list(b.sessions) == ["llm"]
    np.testing.assert_array_equal(out["last_hidden_state"], run_np(b, "llm", feeds)["last_hidden_state"])


def test_torch_backend_view_module(tiny_model):
    import torch
    from rt import run_np

    from janusflow_trt.runtime.torch_backend import TorchBackend

    b = TorchBackend(tiny_model, threads=2)
    feeds = dummy_inputs(b.specs["llm"], seed=5)
    full = run_np(b, "llm", feeds)
    gen = run_np(b, "llm_gen", feeds)
    assert list(gen) == ["last_hidden_state"]
    np.testing.assert_array_equal(gen["last_hidden_state"], full["last_hidden_state"])
    assert torch.is_tensor(next(b.modules["llm_gen"].parameters()))


def test_calibration_records_euler_view_calls_as_llm_samples(tiny_model, tiny_dir, processor, tmp_path):
    """The Euler step calls llm_gen; its feeds are the llm's, and the FP16 / INT8 calibration of the llm
    must keep seeing the Euler-step activations (577-token steps at full size), recorded as 'llm'."""
    from janusflow_trt.recording import Recorder
    from janusflow_trt.runtime import text2img
    from janusflow_trt.runtime.euler_step import euler_loop
    from janusflow_trt.runtime.torch_backend import TorchBackend

    cfg = load_config(tiny_dir)
    rec = Recorder(TorchBackend(tiny_model, threads=2), tmp_path)
    cache = text2img.prefill_prefix(rec, cfg, processor, "a red fox", 1)
    rec.active = {"llm"}
    list(euler_loop(rec, cache, torch.zeros((1, 4, 48, 48)), 2, 2.0))
    assert [f["graph"] for f in rec.files] == ["llm", "llm"]
    for f in rec.files:
        assert np.load(tmp_path / f["file"])["inputs_embeds"].shape[1] == 1 + cfg.num_gen_tokens


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_plan_builds_the_view_from_its_file(ext_onnx, precision):
    """`janusflow build` (plan, no TensorRT): the view gets its own engine, parsed from the view file of
    that precision, with the one Euler-step profile."""
    from janusflow_trt.export.engine_manifest import source_graph
    from janusflow_trt.export.trt_build import plan

    m = _manifest(ext_onnx)
    _, plans = plan(ext_onnx, precision, ["embed", "llm"])
    by = {p.graph: p for p in plans}
    assert list(by) == ["embed", "llm", "llm_gen"]
    want = resolve_graph(m, ext_onnx, "llm_gen", precision)
    assert by["llm_gen"].source == {"file": want["file"], "sha256": want["sha256"]} == \
        source_graph(m, "llm_gen", precision)
    assert [p.name for p in by["llm_gen"].profiles] == ["euler"]
    assert {b.tensor for b in by["llm_gen"].buffers if not b.tensor.startswith("past_")} == \
        {"inputs_embeds", "attention_mask", "position_ids", "last_hidden_state"}  # no logits, no present.*
    _, plans = plan(ext_onnx, precision, ["embed"])  # no llm asked for: no view either
    assert [p.graph for p in plans] == ["embed"]
