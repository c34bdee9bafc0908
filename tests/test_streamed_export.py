"""The streamed export (export/streamed.py: fake-parameter trace, weights read from the safetensors one
tensor at a time) against the inline export of the loaded modules (torch_to_onnx.export_fp32's
streamed=False): the same initializers (names, dtypes, bytes), the same nodes, the same ONNX Runtime
outputs; the weightless checks of a graph above the protobuf limit give the same graph as the inline ones;
an export interrupted while it streams leaves the previous OUT as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxscript.optimizer._constant_folding import DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT

from janusflow_trt.export import onnx_io, streamed, torch_to_onnx
from janusflow_trt.export.onnx_io import ort_session
from janusflow_trt.export.specs import GRAPH_NAMES, build_specs, dummy_inputs
from janusflow_trt.export.torch_to_onnx import export_fp32
from janusflow_trt.export_job import export_graphs
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.tiny import make_tiny

STREAMED = sorted(streamed.STREAMED_GRAPHS)


def graph_content(path: Path) -> dict:
    """What must be equal: initializers by name (dtype, shape, bytes; inline or external alike), node list,
    graph I/O with their shapes."""
    m = onnx.load(str(path))
    inits = {}
    for t in m.graph.initializer:
        a = onnx.numpy_helper.to_array(t)
        inits[t.name] = (str(a.dtype), a.shape, a.tobytes())
    nodes = [(n.op_type, n.domain, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
             for n in m.graph.node]
    io = [v.SerializeToString() for v in list(m.graph.input) + list(m.graph.output)]
    return {"initializers": inits, "nodes": nodes, "io": io, "opset": [(o.domain, o.version) for o in m.opset_import]}


def assert_same_graph(a: Path, b: Path) -> None:
    ga, gb = graph_content(a), graph_content(b)
    assert set(ga["initializers"]) == set(gb["initializers"]), a.name
    for k, v in ga["initializers"].items():
        assert v[:2] == gb["initializers"][k][:2], f"{a.name}: {k} dtype/shape {v[:2]} vs {gb['initializers'][k][:2]}"
        assert v[2] == gb["initializers"][k][2], f"{a.name}: initializer {k} holds other bytes"
    assert ga["nodes"] == gb["nodes"], a.name
    assert ga["io"] == gb["io"] and ga["opset"] == gb["opset"], a.name


def assert_same_outputs(a: Path, b: Path, spec) -> None:
    feeds = dummy_inputs(spec, seed=5)
    for x, y, name in zip(ort_session(a).run(None, feeds), ort_session(b).run(None, feeds), spec.output_names,
                          strict=True):
        assert np.array_equal(x, y), f"{spec.name}: output {name} differs"


def _export(ckpt: Path, out: Path, names: list[str], streamed_: bool) -> dict:
    out.mkdir(parents=True)
    return export_fp32(ckpt, None, out, names, 18, progress=False, streamed=streamed_)[2]


FAST = ["embed", "llm", "gen_dec"]  # the default selection's graphs: the LLM, and transposed weights in both


@pytest.fixture(scope="module")
def inline_tiny(tiny_dir, tmp_path_factory):
    """The reference: tiny graphs exported inline (the real modules traced, weights in memory)."""
    out = tmp_path_factory.mktemp("inline") / "onnx"
    _export(tiny_dir, out, FAST, False)
    return out


@pytest.fixture
def big_threshold(monkeypatch):
    """Every graph above the protobuf-limit stand-in: the weightless checks run (as for the full-size LLM)."""
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 10_000)


def test_default_export_equals_inline(tiny_dir, tiny_onnx, inline_tiny):
    """tiny_onnx (the session's export, default path: streamed, weights inline in the file)."""
    specs = build_specs(load_config(tiny_dir))
    for name in FAST:
        assert_same_graph(inline_tiny / f"{name}.onnx", tiny_onnx / f"{name}.onnx")
        assert_same_outputs(inline_tiny / f"{name}.onnx", tiny_onnx / f"{name}.onnx", specs[name])


def test_streamed_weightless_equals_inline(tiny_dir, inline_tiny, tmp_path, monkeypatch, big_threshold):
    """Above the limit: streamed into the data file, then renamed, GELU-reordered and simplified on the
    weightless proto: the graph equals the inline export's, onnxslim kept, no side file left. No module with
    real weights is built, and every weight above the folder's size limit is read exactly once (written
    as it is read: the embedding, the LM head, the transposed gen_dec linears at tiny size)."""
    def no_model(*a, **k):
        raise AssertionError("the streamed export loaded the model")

    reads: list[str] = []
    real_read = streamed.CheckpointTensors.read

    def counted(self, key, perm=None):
        reads.append(key)
        return real_read(self, key, perm)

    monkeypatch.setattr(torch_to_onnx, "load_model", no_model)
    monkeypatch.setattr(streamed.CheckpointTensors, "read", counted)
    out = tmp_path / "o"
    entries = _export(tiny_dir, out, FAST, True)
    specs = build_specs(load_config(tiny_dir))
    for name in FAST:
        assert entries[name]["streamed"] is True
        assert entries[name]["external_data"]["file"] == f"{name}.onnx.data"
        assert entries[name]["simplified"] is True, entries[name]["simplified"]
        assert_same_graph(inline_tiny / f"{name}.onnx", out / f"{name}.onnx")
        assert_same_outputs(inline_tiny / f"{name}.onnx", out / f"{name}.onnx", specs[name])
    assert sorted(p.name for p in out.iterdir()) == sorted(f for n in FAST for f in (f"{n}.onnx", f"{n}.onnx.data"))
    ckpt = streamed.CheckpointTensors(tiny_dir, load_config(tiny_dir))
    big = {k for k in set(reads) if real_read(ckpt, k).size > DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT}
    assert {"language_model.lm_head.weight", "language_model.model.embed_tokens.weight"} <= big
    assert any(k.startswith("vision_gen_dec_model.") for k in big)
    assert all(reads.count(k) == 1 for k in big), {k: reads.count(k) for k in big}


def test_failed_streamed_export_falls_back_to_the_module(tiny_dir, inline_tiny, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("planted tracing failure")

    monkeypatch.setattr(torch_to_onnx, "export_streamed", broken)
    entries = _export(tiny_dir, tmp_path / "o", ["embed"], True)
    assert "streamed" not in entries["embed"] and entries["embed"]["exporter"] == "dynamo"
    assert_same_graph(inline_tiny / "embed.onnx", tmp_path / "o" / "embed.onnx")


def test_interrupted_while_streaming_keeps_previous_out(tiny_dir, tmp_path, monkeypatch):
    """Interrupted while a weight is read for writing: OUT is the previous export, byte for byte, and
    nothing is left beside it."""
    out = tmp_path / "out"
    export_graphs(tiny_dir, None, out, graphs="embed", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    n: list[str] = []

    def interrupted(self, key, perm=None):
        n.append(key)
        raise KeyboardInterrupt

    monkeypatch.setattr(streamed.CheckpointTensors, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_graphs(tiny_dir, None, out, graphs="embed", progress=False, force=True)
    assert n == ["language_model.model.embed_tokens.weight"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_every_tiny_graph_equals_inline(tiny_dir, tiny_onnx, tmp_path):
    ref = tmp_path / "inline"
    _export(tiny_dir, ref, list(GRAPH_NAMES), False)
    specs = build_specs(load_config(tiny_dir))
    for name in GRAPH_NAMES:
        assert_same_graph(ref / f"{name}.onnx", tiny_onnx / f"{name}.onnx")
        assert_same_outputs(ref / f"{name}.onnx", tiny_onnx / f"{name}.onnx", specs[name])


@pytest.mark.slow
def test_small_preset_streamed_equals_inline(tmp_path, monkeypatch):
    """The small preset (real width ratios / 4), every graph above the limit stand-in: streamed + weightless
    checks vs the inline export with its weights loaded."""
    ckpt = make_tiny(tmp_path / "small", size="small", seed=0)
    ref = tmp_path / "inline"
    _export(ckpt, ref, list(GRAPH_NAMES), False)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 1_000_000)
    entries = _export(ckpt, tmp_path / "streamed", list(GRAPH_NAMES), True)
    specs = build_specs(load_config(ckpt))
    for name in GRAPH_NAMES:
        assert entries[name].get("streamed") is (True if name in STREAMED else None)
        assert entries[name]["external_data"]
        assert_same_graph(ref / f"{name}.onnx", tmp_path / "streamed" / f"{name}.onnx")
        assert_same_outputs(ref / f"{name}.onnx", tmp_path / "streamed" / f"{name}.onnx", specs[name])


def test_weightless_fp16_equals_inline(tiny_dir, fp16_onnx, tmp_path):
    """The FP16 variant of a graph above the limit is converted on its weightless proto and its weights
    streamed one at a time (export/fp16.py: stream_weights): the same graph as the inline conversion of
    the session's fp32,fp16 export (fp16_onnx), from the same FP32 graph and calibration set."""
    from test_fp16 import PLAN

    from janusflow_trt.calibration.record import CalibrationData
    from janusflow_trt.export.fp16 import derive_fp16

    specs = build_specs(load_config(tiny_dir))
    src = tmp_path / "llm.onnx"
    onnx.save_model(onnx.load(str(fp16_onnx / "llm.onnx")), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="llm.onnx.data", size_threshold=256)
    calib = CalibrationData(fp16_onnx / "calib")
    r = derive_fp16(src, specs["llm"], calib, tmp_path / "llm.fp16.onnx", True, limit=PLAN.measure_samples,
                    check=PLAN.check_samples)
    assert r["data"] == "llm.fp16.onnx.data"
    m = onnx.load(str(tmp_path / "llm.fp16.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL and t.data_type == onnx.TensorProto.FLOAT16
               for t in m.graph.initializer)
    assert_same_graph(fp16_onnx / "llm.fp16.onnx", tmp_path / "llm.fp16.onnx")


@pytest.mark.parametrize("graph", ["llm", "gen_dec"])
def test_weightless_int8_cpu_equals_loaded(tiny_dir, int8_onnx, tmp_path, monkeypatch, graph):
    """The int8-cpu variant of a graph with external weights derived without loading them
    (export/int8.py: named_streamed, SmoothQuant's migration streamed weight by weight for the LLM; the
    quantized graph's consumers rewired on its weightless proto): the same graph (initializers' names,
    dtypes, bytes; nodes) and recipe as derive_int8(streamed=False), the loaded-model path, from the same
    FP32 file and calibration set."""
    from test_int8 import PLAN

    from janusflow_trt.calibration.record import CalibrationData
    from janusflow_trt.export import int8

    spec = build_specs(load_config(tiny_dir))[graph]
    calib = CalibrationData(int8_onnx / "calib")
    src = tmp_path / "src" / f"{graph}.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(str(int8_onnx / f"{graph}.onnx")), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=f"{graph}.onnx.data", size_threshold=256)
    out = {}
    for mode in ("loaded", "streamed"):
        (tmp_path / mode).mkdir()
        out[mode] = tmp_path / mode / f"{graph}.int8-cpu.onnx"
        if mode == "streamed":  # the streamed path never loads the FP32 weights into a proto
            monkeypatch.setattr(int8, "load_smoothed", lambda *a, **k: pytest.fail("load_smoothed called"))
        out[mode + "_recipe"] = int8.derive_int8(src, spec, calib, out[mode], "int8-cpu", limit=PLAN.measure_samples,
                                                 big=True, streamed=mode == "streamed")
        assert sorted(p.name for p in (tmp_path / mode).iterdir()) == sorted(
            [out[mode].name, f"{out[mode].name}.data"]), "only the variant and its data file are left"
    m = onnx.load(str(out["streamed"]), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL and t.data_type == onnx.TensorProto.INT8
               for t in m.graph.initializer)
    r, ref = out["streamed_recipe"]["recipe"], out["loaded_recipe"]["recipe"]
    assert r == ref
    if graph == "llm":
        assert r["smoothquant"]["products"], "the LLM is smoothed (the migration is what this compares)"
    assert_same_graph(out["loaded"], out["streamed"])


def test_fp16_calibration_check_one_session_at_a_time(tiny_dir, fp16_onnx, monkeypatch):
    """export/fp16.py: calibration_check never holds the FP32 and the FP16 session together (at full size
    the two are 5.8 + 2.9 GB of weights), and its worst cosines are those of the two graphs run
    independently on the same samples (cosine computed here with numpy)."""
    import weakref

    import onnxruntime as ort

    from janusflow_trt.calibration.record import CalibrationData
    from janusflow_trt.export import fp16
    from janusflow_trt.export.specs import precision_variant

    spec = build_specs(load_config(tiny_dir))["llm"]
    calib = CalibrationData(fp16_onnx / "calib")
    live, most = [0], [0]

    def counted(*a, **k):
        s = ort_session(*a, **k)
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(s, lambda: live.__setitem__(0, live[0] - 1))
        return s

    monkeypatch.setattr(fp16, "ort_session", counted)
    r = fp16.calibration_check(fp16_onnx / "llm.onnx", fp16_onnx / "llm.fp16.onnx", spec,
                               lambda: calib.samples("llm"), 3)
    assert most[0] == 1, "the FP32 and FP16 sessions were alive together"
    assert r["samples"] == 3 and r["finite"]
    s32 = ort.InferenceSession(str(fp16_onnx / "llm.onnx"), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(str(fp16_onnx / "llm.fp16.onnx"), providers=["CPUExecutionProvider"])
    spec16 = precision_variant(spec, "fp16")
    want: dict[str, float] = {}
    for k, feeds in enumerate(calib.samples("llm")):
        if k == 3:
            break
        a = s32.run(spec.output_names, feeds)
        b = s16.run(spec.output_names, {t.name: feeds[t.name].astype(t.dtype) for t in spec16.inputs})
        for name, x, y in zip(spec.output_names, a, b, strict=True):
            x, y = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
            want[name] = min(want.get(name, 1.0), float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    assert r["min_cosine"].keys() == want.keys()
    for name, c in want.items():
        assert r["min_cosine"][name] == pytest.approx(c, rel=1e-6, abs=1e-6), name


def test_to_float16_equals_the_converters_bytes():
    """fp16.to_float16 (the streamed FP16 weights' conversion) writes the bytes of the float16 converter's
    convert_np_to_float16: zeros, NaN, inf, values at and around both clamps, subnormals, and a spread over
    80 binary orders of magnitude, across chunk boundaries (chunk=7)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from janusflow_trt.export.fp16 import to_float16

    f32 = np.float32
    edge = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 5.96e-08, -5.96e-08, np.nextafter(f32(5.96e-08), f32(0)),
                     np.nextafter(f32(5.96e-08), f32(1)), 3e-8, -3e-8, 1e-45, -1e-45, 65504.0, -65504.0,
                     np.nextafter(f32(65504), f32(1e9)), -65505.0, 65519.0, 65520.0, -7e4, 3e38, -3e38, 1.0, -2.5,
                     1e-5, -6.1e-5], np.float32)
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(20_000) * np.exp2(rng.uniform(-60, 20, 20_000))
    for a in (edge, spread.astype(np.float32).reshape(100, 200)):
        want = convert_np_to_float16(a)
        for chunk in (7, 1 << 22):
            got = to_float16(a, chunk)
            assert got.dtype == np.float16 and got.shape == a.shape
            assert got.tobytes() == want.tobytes(), np.flatnonzero(got.view(np.uint16) != want.view(np.uint16))[:5]
