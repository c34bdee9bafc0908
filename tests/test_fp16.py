"""FP16 variants: islands by measurement, the VAE overflow case, runtime loading, the quality metrics,
and the bad inputs of --precision / calibration files."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from janusflow_trt.calibration.data import InputSet, builtin_calibration
from janusflow_trt.calibration.record import CalibrationData, Plan, spread
from janusflow_trt.export.quality_metrics import agreement, cosine, first_divergence, psnr, tensor_metrics, worst

PLAN = Plan(steps=4, full_runs=2, full_stride=2, early_steps=2)  # small: the tests time the machinery


def small_inputs() -> InputSet:
    b = builtin_calibration()
    return InputSet(b.prompts[:4], b.pairs[:2])


# fp16_onnx (the tiny checkpoint exported at fp32,fp16 with PLAN, small_inputs()): tests/conftest.py


# -- metrics vs hand-computed values -------------------------------------------------------------
def test_metrics_hand_values():
    m = tensor_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert m["max_abs"] == 1.0
    assert m["cosine"] == pytest.approx(17 / math.sqrt(14 * 21), abs=1e-12)
    assert m["max_rel"] == pytest.approx(1 / (4 + 1e-3 * 4), abs=1e-12)
    assert m["finite"]
    assert not tensor_metrics(np.array([np.inf, 1.0]), np.array([1.0, 1.0]))["finite"]
    assert cosine([1, 0], [0, 1]) == 0.0 and cosine([2, 2], [1, 1]) == pytest.approx(1.0)
    assert psnr(np.array([0, 0], np.uint8), np.array([0, 10], np.uint8)) == pytest.approx(10 * math.log10(255**2 / 50))
    assert psnr(np.zeros(3), np.zeros(3)) == math.inf
    assert agreement([1, 2, 3], [1, 5, 3, 4]) == 0.5
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert first_divergence([1, 2], [1, 2]) is None
    # a sign flip is the worst cosine, not the best
    assert cosine([1, 0], [-1, 0]) == -1.0 and cosine([1, 2], [-2, -4]) == pytest.approx(-1.0, abs=1e-12)
    # worst(): each metric's worst over the samples, from different samples
    rows = [{"max_abs": 1.0, "max_rel": 1.0, "cosine": 0.9, "finite": True},
            {"max_abs": 2.0, "max_rel": 0.5, "cosine": 0.99, "finite": False}]
    assert worst(rows) == {"max_abs": 2.0, "max_rel": 1.0, "cosine": 0.9, "finite": False, "samples": 2}


# -- the exported fp16 variant -------------------------------------------------------------------
def _types(path) -> dict[str, int]:
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = m.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.output, *g.input]}


def test_islands_where_measured(fp16_onnx):
    m = json.loads((fp16_onnx / "manifest.json").read_text())
    e = m["graphs"]["llm"]["precisions"]["fp16"]
    assert e["derived_from"] == "llm.onnx"
    recipe = e["recipe"]
    # the attention mask's fill value (-1e9 in the FP32 graph) cannot exist in FP16: measured, kept FP32
    assert any(v > 65504 for v in (t["absmax"] for t in recipe["flagged_tensors"].values()))
    fp16 = onnx.load(str(fp16_onnx / e["file"]))
    types = _types(fp16_onnx / e["file"])
    nodes = {n.name: n for n in fp16.graph.node}
    measured = [n for n, why in recipe["kept_fp32"].items() if why.startswith("measured")]
    assert measured
    for name in recipe["kept_fp32"]:
        for o in nodes[name].output:
            if o in types and types[o] in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                assert types[o] == onnx.TensorProto.FLOAT, f"{name} ({recipe['kept_fp32'][name]}) is not FP32"
    # and the rest is FP16: the MatMuls not kept
    mm = [n for n in fp16.graph.node if n.op_type == "MatMul" and n.name not in recipe["kept_fp32"]]
    assert mm and all(types.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in mm)
    # boundary: KV FP16, logits FP32
    io = {v.name: v.type.tensor_type.elem_type for v in [*fp16.graph.input, *fp16.graph.output]}
    assert io["past_key_values.0.key"] == io["present.0.key"] == onnx.TensorProto.FLOAT16
    assert io["logits"] == io["inputs_embeds"] == onnx.TensorProto.FLOAT
    assert m["calibration"]["samples"]["llm"] > 0 and len(m["calibration"]["sha256"]) == 64


def test_timestep_argument_fp32(fp16_onnx):
    """The sin/cos argument (t up to ~967: FP16 spacing 0.5 there, and t * frequency) stays FP32 from the
    graph input on; measured before: t_emb cosine 0.996 on held-out timesteps, the MLP after sin/cos
    kept FP32 changed nothing."""
    from janusflow_trt.export.onnx_io import ort_session
    from janusflow_trt.janusflow_ref.generation import timestep

    m = json.loads((fp16_onnx / "manifest.json").read_text())
    recipe = m["graphs"]["gen_enc"]["precisions"]["fp16"]["recipe"]
    fp32 = onnx.load(str(fp16_onnx / "gen_enc.onnx"))
    producer = {o: n for n in fp32.graph.node for o in n.output}
    upstream, todo = set(), [x for n in fp32.graph.node if n.op_type in ("Sin", "Cos") for x in n.input]
    while todo:
        if (p := producer.get(todo.pop())) is not None:
            upstream.add(p.name)
            todo.extend(p.input)
    assert {producer[x].op_type for x in producer if producer[x].name in upstream} >= {"Mul", "Unsqueeze"}
    assert upstream <= set(recipe["kept_fp32"]) and all(recipe["kept_fp32"][n].startswith("rule") for n in upstream)
    fp16 = onnx.load(str(fp16_onnx / m["graphs"]["gen_enc"]["precisions"]["fp16"]["file"]))
    assert [n.op_type for n in fp16.graph.node if "t" in n.input] == ["Unsqueeze"]  # t is not cast to FP16 first
    rng = np.random.default_rng(5)
    t = np.array([timestep(s, 30) for s in range(30)], np.float32)
    z = rng.standard_normal((30, 4, 48, 48)).astype(np.float32)
    a = ort_session(fp16_onnx / "gen_enc.onnx").run(["t_emb"], {"z": z, "t": t})[0]
    dtype = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in fp16.graph.input}
    b = ort_session(fp16_onnx / m["graphs"]["gen_enc"]["precisions"]["fp16"]["file"]).run(
        ["t_emb"], {"z": z.astype(dtype["z"]), "t": t.astype(dtype["t"])})[0].astype(np.float32)
    assert min(cosine(x, y) for x, y in zip(a, b, strict=True)) > 0.99999


def test_fp16_runs_in_ort(fp16_onnx, tiny_dir, tiny_model, processor, test_image):
    from rt import rt_chat, rt_euler

    from janusflow_trt.janusflow_ref.processor import load_image
    from janusflow_trt.janusflow_ref.sampling import SamplingParams
    from janusflow_trt.runtime.backends import OrtBackend

    cfg = tiny_model.cfg
    b16, b32 = OrtBackend(fp16_onnx, cfg, threads=2, precision="fp16"), OrtBackend(fp16_onnx, cfg, threads=2)
    assert b16.kv_dtype == torch.float16
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    img = load_image(test_image)
    a16 = rt_chat(b16, cfg, processor, img, "What is this?", params)
    a32 = rt_chat(b32, cfg, processor, img, "What is this?", params)
    assert a16 == a32
    z0 = np.random.default_rng(0).standard_normal((1, 4, 48, 48)).astype(np.float32)
    zs = {}
    for name, b in (("16", b16), ("32", b32)):
        zs[name] = rt_euler(b, cfg, processor, "a red fox", z0, 3, 2.0)[-1]
    assert np.isfinite(zs["16"]).all()
    assert cosine(zs["16"], zs["32"]) > 0.9995


def test_verify_fp16(fp16_onnx, tiny_dir):
    from janusflow_trt.export.verify import verify

    assert verify(tiny_dir, fp16_onnx, None, print_table=False, precision="fp16").ok


def test_refuses_precision_not_exported(tiny_onnx, tiny_model):
    from janusflow_trt.errors import CheckpointError
    from janusflow_trt.runtime.backends import OrtBackend

    with pytest.raises(CheckpointError, match="not exported at precision fp16"):
        OrtBackend(tiny_onnx, tiny_model.cfg, precision="fp16")


def test_calibration_reused(fp16_onnx, tiny_dir, tmp_path):
    """Re-exporting into the same OUT with the same inputs reuses the recorded set (same hash); a set
    recorded by another backend is not reused (an export of some graphs records on torch-fast)."""
    from janusflow_trt.export_job import export_graphs

    out = tmp_path / "onnx"
    shutil.copytree(fp16_onnx, out)
    old = json.loads((fp16_onnx / "manifest.json").read_text())["calibration"]
    m = export_graphs(tiny_dir, None, out, graphs="embed", progress=False, precisions="fp32,fp16",
                      calib_inputs=small_inputs(), calib_plan=PLAN, force=True)
    assert not m["calibration"]["reused"] and m["calibration"]["sha256"] != old["sha256"]
    shutil.rmtree(out)
    shutil.copytree(fp16_onnx, out)
    m = export_graphs(tiny_dir, None, out, progress=False, precisions="fp32,fp16",
                      calib_inputs=small_inputs(), calib_plan=PLAN, force=True)
    assert m["calibration"]["reused"] and m["calibration"]["sha256"] == old["sha256"]


def test_recording_releases_siglip_before_the_images(fp16_onnx, tiny_dir, tmp_path, monkeypatch):
    """The ORT recording drops SigLIP's session after the chats (runtime/backends.release): no text-to-image
    call runs with it loaded; the recorded set is the same as with it kept (the fixture's, same plan)."""
    from janusflow_trt import recording
    from janusflow_trt.export.torch_to_onnx import resolve_vae
    from janusflow_trt.runtime.backends import SeamWrapper

    seen: list[tuple[str, set[str]]] = []

    class Watch(SeamWrapper):
        def run(self, graph, feeds):
            seen.append((graph, set(self.inner.sessions)))
            return self.inner.run(graph, feeds)

    real = recording.make_backend
    monkeypatch.setattr(recording, "make_backend", lambda *a, **k: Watch(real(*a, **k)))
    graphs = list(json.loads((fp16_onnx / "manifest.json").read_text())["graphs"])
    vae = resolve_vae(tiny_dir, None, True)  # the export's: the checkpoint's vae/ folder
    index = recording.record(tiny_dir, vae, tmp_path / "calib", small_inputs(), PLAN, False, fp16_onnx, graphs)
    assert any(g == "siglip" for g, _ in seen)
    t2i = [s for g, s in seen if g in ("gen_enc", "llm_gen", "gen_dec")]
    assert t2i and all("siglip" not in s for s in t2i)
    old = json.loads((fp16_onnx / "calib" / "index.json").read_text())
    assert [(f["graph"], f["source"]) for f in index["files"]] == [(f["graph"], f["source"]) for f in old["files"]]
    for f in index["files"]:  # the same values recorded, file by file (npz bytes carry a zip timestamp)
        with np.load(tmp_path / "calib" / f["file"]) as a, np.load(fp16_onnx / "calib" / f["file"]) as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files), f["file"]


def test_recording_runs_on_the_fp32_export(fp16_onnx, lean_onnx, tiny_dir, tmp_path, monkeypatch):
    """The export records its calibration set through ONNX Runtime over the FP32 graphs it just wrote (all
    graphs exported) and on torch-fast on the checkpoint otherwise (lean_onnx: llm and gen_enc only); the
    ORT-recorded Euler-step inputs are those the ORT pipeline over the export gives (replayed here: the
    first steps' z of the full run), not torch-fast's."""
    from rt import rt_euler

    from janusflow_trt.calibration.record import CalibrationData
    from janusflow_trt.janusflow_ref.config import load_config
    from janusflow_trt.janusflow_ref.generation import initial_latents
    from janusflow_trt.janusflow_ref.processor import Processor
    from janusflow_trt.runtime.backends import OrtBackend
    from janusflow_trt.runtime.torch_backend import load_torch_backend

    assert json.loads((fp16_onnx / "calib" / "index.json").read_text())["backend"] == "ort"
    assert json.loads((lean_onnx / "calib" / "index.json").read_text())["backend"] == "torch-fast"
    data = CalibrationData(fp16_onnx / "calib")
    cfg, processor = load_config(tiny_dir), Processor(tiny_dir)
    ort_b, torch_b = OrtBackend(fp16_onnx, cfg), load_torch_backend(tiny_dir, None, None)
    checked = 0
    for p in range(PLAN.full_runs):  # the full runs: prompt p from initial_latents(seed 1000 + p)
        prompt, z0 = small_inputs().prompts[p], initial_latents(1, seed=1000 + p).numpy()
        ort_z, torch_z = (rt_euler(b, cfg, processor, prompt, z0, PLAN.steps, PLAN.cfg_weight)
                          for b in (ort_b, torch_b))
        for f in data.index["files"]:
            if f["graph"] == "gen_enc" and f["source"].startswith(f"t2i:{p}:step") and f["source"] != f"t2i:{p}:step0":
                k = int(f["source"].rsplit("step", 1)[1])
                with np.load(fp16_onnx / "calib" / f["file"]) as npz:
                    z = npz["z"]  # the CFG pair's two rows: the image's z twice
                np.testing.assert_array_equal(z, np.concatenate([ort_z[k - 1]] * 2))
                assert np.abs(z - torch_z[k - 1]).max() > 0  # the other backend's z differs
                checked += 1
    assert checked >= 2


# -- the measurement's budget: sample cap, lean recording, byte-sized chunks -----------------------
LEAN = Plan(steps=4, full_runs=1, full_stride=1, early_steps=2, max_prompts=3, max_pairs=1, measure_samples=3,
            check_samples=1, name="lean-test")


def test_spread_hand_values():
    assert spread(4, 3) == [0, 2, 3] and spread(10, 4) == [0, 3, 6, 9] and spread(7, 1) == [0]
    assert spread(3, None) == spread(3, 5) == [0, 1, 2] and spread(3, 0) == []


def test_select_spread_over_kinds(fp16_onnx):
    data = CalibrationData(fp16_onnx / "calib")
    files = [f for f in data.index["files"] if f["graph"] == "llm"]
    # kinds by hand from the sources: within a chat the first llm call is the prefill, the rest decode
    firsts = {}
    for i, f in enumerate(files):
        firsts.setdefault(f["source"], i)
    kind = {f["file"]: ("chat prefill" if firsts[f["source"]] == i else "chat decode") if f["source"].startswith("chat")
            else "euler step" if ":step" in f["source"] else "text prefill" for i, f in enumerate(files)}
    assert set(kind.values()) == {"chat prefill", "chat decode", "text prefill", "euler step"}
    steps = [int(f["source"].split(":step")[1]) for f in files if ":step" in f["source"]]
    assert len(files) > 6 and len(set(steps)) == PLAN.steps
    got = data.select("llm", 6)
    assert got == data.select("llm", 6)  # deterministic
    assert len(got) == 6 and [f for _, f in got] == [f for f in files if f in [g for _, g in got]]  # recording order
    assert {kind[f["file"]] for _, f in got} == set(kind.values())  # every kind of call
    picked = [int(f["source"].split(":step")[1]) for _, f in got if ":step" in f["source"]]
    assert min(picked) == min(steps) and max(picked) == max(steps)  # first and last timestep
    assert [f for _, f in data.select("llm")] == files
    assert len(list(data.samples("llm", 2))) == 2


@pytest.fixture(scope="module")
def lean_onnx(tiny_dir, tmp_path_factory):
    from janusflow_trt.export_job import export_graphs

    out = tmp_path_factory.mktemp("lean") / "onnx"
    export_graphs(tiny_dir, None, out, graphs="llm,gen_enc", progress=False, precisions="fp32,fp16",
                  calib_inputs=small_inputs(), calib_plan=LEAN)
    return out


def test_lean_plan_and_cap_recorded(lean_onnx):
    m = json.loads((lean_onnx / "manifest.json").read_text())
    assert m["calibration"]["plan"]["name"] == "lean-test" and m["calibration"]["plan"]["measure_samples"] == 3
    index = json.loads((lean_onnx / "calib" / "index.json").read_text())
    assert index["num_prompts"] == 3 and index["num_pairs"] == 1  # of 4 prompts and 2 pairs given
    assert len({f["source"] for f in index["files"] if f["source"].startswith("chat:")}) == 1
    for g in ("llm", "gen_enc"):
        r = m["graphs"][g]["precisions"]["fp16"]["recipe"]
        assert r["calibration_samples_recorded"] == m["calibration"]["samples"][g] > 3
        assert r["calibration_samples"] == sum(r["calibration_samples_by_kind"].values()) == 3  # the cap was used
        assert r["calibration_check"]["samples"] == 1
    assert len(m["graphs"]["llm"]["precisions"]["fp16"]["recipe"]["calibration_samples_by_kind"]) == 3


def test_chunks_by_bytes(fp16_onnx):
    """Exposed tensors in byte-sized chunks: the estimate never below what ONNX Runtime returns, and the
    tensors walked do not depend on the chunking."""
    import onnxruntime as ort

    from janusflow_trt.calibration.ranges import float_tensors, plan_chunks, tensor_bytes, walk_exposed

    data = CalibrationData(fp16_onnx / "calib")
    path = fp16_onnx / "llm.onnx"
    model = onnx.load(str(path))
    names, _ = float_tensors(model)
    feeds_list = list(data.samples("llm", 4))
    # and a 2-row copy of each (CFG-like batch): where inference leaves the batch symbolic
    feeds_list += [{k: np.concatenate([x, x]) for k, x in f.items()} for f in feeds_list]
    for feeds in feeds_list:
        est = tensor_bytes(model, names, {k: v.shape for k, v in feeds.items()})
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                  for n in names if n not in {o.name for o in model.graph.output})
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, feeds)
        assert all(est[n] >= x.nbytes for n, x in zip(names, got, strict=True))
        assert sum(est[n] == x.nbytes for n, x in zip(names, got, strict=True)) > 0.7 * len(names)
        model = onnx.load(str(path))
    samples = lambda: data.samples("llm", 4)  # noqa: E731
    whole = {(k, n): x for k, vals in walk_exposed(path, samples, names) for n, x in vals.items()}
    parts = plan_chunks(onnx.load(str(path), load_external_data=False), samples, names, 1 << 20)
    assert len(parts) > 3
    cut = {(k, n): x for k, vals in walk_exposed(path, samples, names, parts) for n, x in vals.items()}
    assert whole.keys() == cut.keys() and all(np.array_equal(whole[k], cut[k], equal_nan=True) for k in whole)
    # one run's tensors alive at a time: the dict a caller's loop variable still holds is emptied before
    # the next run (at full size two chunks together were 2 GB more at the int8-cpu walk's peak)
    walk = walk_exposed(path, samples, names, parts)
    held = [vals for _, (_, vals) in zip(range(3), walk, strict=False)]
    assert held[-1] and not any(held[:-1]), [len(v) for v in held]


def _figures(x: np.ndarray) -> tuple[float, int, int, int]:
    """A tensor's range figures by numpy: (absmax over finite values, nonzero, FP16-flushed, non-finite)."""
    a = np.abs(x.astype(np.float64))
    fin = np.isfinite(a)
    return (float(a[fin].max()) if fin.any() else 0.0, int((a != 0).sum()),
            int(((a != 0) & (a < 2.0**-25)).sum()), int((~fin).sum()))


def test_measure_in_graph_equals_numpy_on_the_tensors(fp16_onnx):
    """measure's in-graph statistics (one run per sample) == the figures numpy computes from the same
    tensors exposed as outputs, summed / maxed over the samples, for every float tensor of the graph."""
    from janusflow_trt.calibration.ranges import float_tensors, measure, walk_exposed

    data = CalibrationData(fp16_onnx / "calib")
    path = fp16_onnx / "llm.onnx"
    names, _ = float_tensors(onnx.load(str(path), load_external_data=False))
    samples = lambda: data.samples("llm", 4)  # noqa: E731
    want: dict[str, list] = {}
    for _, vals in walk_exposed(path, samples, names):
        for n, x in vals.items():
            f = _figures(x)
            w = want.setdefault(n, [0.0, 0, 0, 0])
            want[n] = [max(w[0], f[0]), w[1] + f[1], w[2] + f[2], w[3] + f[3]]
    got = measure(path, samples)
    assert got.samples == 4 and got.chunks == 1 and set(got.tensors) == set(names) == set(want)
    for n in names:
        r = got.tensors[n]
        assert [r.absmax, r.nonzero, r.flushed, r.nonfinite] == pytest.approx(want[n], rel=1e-7, abs=0), n


def test_measure_counts_flushes_and_non_finite_values(tmp_path):
    """The figures FP16 islands are chosen by, on values built to hit each: zeros, FP16 underflow,
    NaN / inf, a finite maximum beside an inf, and an empty tensor."""
    from janusflow_trt.calibration.ranges import measure

    h = onnx.helper
    FLOAT = onnx.TensorProto.FLOAT
    g = h.make_graph([h.make_node("Mul", ["x", "two"], ["y"]), h.make_node("Slice", ["y", "s", "e"], ["empty"]),
                      h.make_node("Identity", ["empty"], ["z"])], "g",
                     [h.make_tensor_value_info("x", FLOAT, [8])], [h.make_tensor_value_info("z", FLOAT, [0])],
                     [h.make_tensor("two", FLOAT, [], [2.0]), h.make_tensor("s", onnx.TensorProto.INT64, [1], [3]),
                      h.make_tensor("e", onnx.TensorProto.INT64, [1], [3])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "g.onnx"))
    feeds = [np.array([0, 0, 1e-9, -2e-8, 3.0, np.inf, np.nan, -1e-3], np.float32),
             np.array([0, 5e-9, 0, 0, -7.5, 0, 0, 1.0], np.float32)]
    # a lone NaN among ones, at each position: ONNX Runtime's ReduceMax / ReduceMin drop a NaN at some
    # positions (the SIMD max keeps the other operand), so only a NaN-propagating test finds every one
    feeds += [np.where(np.arange(8) == k, np.nan, 1.0).astype(np.float32) for k in range(8)]
    r = measure(tmp_path / "g.onnx", lambda: ({"x": x} for x in feeds))
    y = r.tensors["y"]
    want = [_figures(2 * x) for x in feeds]
    assert (y.absmax, y.nonzero, y.flushed, y.nonfinite) == (15.0, sum(w[1] for w in want),
                                                            sum(w[2] for w in want), 2 + 8)
    assert y.flushed == 2 and y.nonzero == 9 + 64  # 2e-9 and 1e-8 underflow in FP16, -4e-8 does not; NaN, inf count
    e = r.tensors["empty"]
    assert (e.absmax, e.nonzero, e.flushed, e.nonfinite) == (0.0, 0, 0, 0)


# -- the SDXL-VAE overflow case ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def hot_vae_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with its VAE decoder's input conv scaled 1e5x: the residual stream runs at
    ~1e5 (beyond FP16's 65504), while every GroupNorm brings the branches back to O(1) in FP32."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("hot") / "tiny"
    shutil.copytree(tiny_dir, d)
    f = d / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    for k in ("decoder.conv_in.weight", "decoder.conv_in.bias"):
        sd[k] = sd[k] * 1e5
    save_file(sd, str(f), metadata={"format": "pt"})
    return d


def test_vae_overflow(hot_vae_dir, tmp_path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from janusflow_trt.export.onnx_io import ort_session
    from janusflow_trt.export_job import export_graphs
    from janusflow_trt.images import to_uint8

    out = tmp_path / "onnx"
    m = export_graphs(hot_vae_dir, None, out, graphs="vae_dec", progress=False, precisions="fp32,fp16",
                      calib_inputs=small_inputs(), calib_plan=PLAN)
    e = m["graphs"]["vae_dec"]["precisions"]["fp16"]
    assert any(why.startswith("measured") for why in e["recipe"]["kept_fp32"].values())
    naive = tmp_path / "naive.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(out / "vae_dec.onnx")), keep_io_types=True), str(naive))
    z = np.random.default_rng(123).standard_normal((2, 4, 48, 48)).astype(np.float32)  # held-out latents
    ref = ort_session(out / "vae_dec.onnx").run(None, {"latents": z})[0]
    assert np.isfinite(ref).all()
    bad = ort_session(naive).run(None, {"latents": z})[0]
    assert not np.isfinite(bad).all()
    got = ort_session(out / e["file"]).run(None, {"latents": z})[0]
    assert np.isfinite(got).all()
    for a, b in zip(to_uint8(got), to_uint8(ref), strict=True):
        assert psnr(a, b) >= 35.0


def test_vae_precision_fp32(tiny_dir, tmp_path):
    from janusflow_trt.export_job import export_graphs

    m = export_graphs(tiny_dir, None, tmp_path / "o", graphs="vae_dec", progress=False, precisions="fp32,fp16",
                      calib_inputs=small_inputs(), calib_plan=PLAN, vae_precision="fp32")
    assert m["graphs"]["vae_dec"]["precisions"]["fp16"]["file"] == "vae_dec.onnx"


# -- bad input: one line, exit 2, nothing written ---------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "janusflow_trt.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("case", ["precision", "no_images", "empty_prompts", "not_utf8", "prompts_dir"])
def test_bad_calibration_inputs(case, tiny_dir, tmp_path):
    out = tmp_path / "out"
    args = ["export", "--model", str(tiny_dir), "--out", str(out), "--precision", "fp32,fp16", "--quiet"]
    if case == "precision":
        args[args.index("fp32,fp16")] = "fp32,fp8"
    elif case == "no_images":
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "notes.txt").write_text("no image here")
        args += ["--calib-images", str(tmp_path / "imgs")]
    elif case == "empty_prompts":
        (tmp_path / "p.txt").write_text("\n  \n")
        args += ["--calib-prompts", str(tmp_path / "p.txt")]
    elif case == "not_utf8":
        (tmp_path / "p.txt").write_bytes(b"a red fox\n\xff\xfe caf\xe9\n")
        args += ["--calib-prompts", str(tmp_path / "p.txt")]
    else:
        args += ["--calib-prompts", str(tmp_path)]
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# -- quality: the output policy (existing outputs need --force; all three renamed together) -------------
def test_quality_outputs(fp16_onnx, tiny_onnx, tiny_dir, tmp_path, capfd):
    from contract import assert_refused, run_cli, snapshot

    q = tmp_path / "q"
    base = ["quality", "--model", tiny_dir, "--precision", "fp16", "--tokens", "2", "--steps", "2", "--quiet"]
    # a run that fails after the check (fp16 not exported) creates nothing, not even the directory
    assert_refused([*base, "--artifacts", tiny_onnx, "--out", q / "sub"], capfd, [tmp_path], "not exported")
    assert not q.exists()
    (tmp_path / "file").write_text("mine")
    assert_refused([*base, "--artifacts", fp16_onnx, "--out", tmp_path / "file"], capfd, [tmp_path], "not a directory")
    q.mkdir()
    (q / "quality.md").write_text("my notes")
    (q / "other.txt").write_text("keep")
    assert_refused([*base, "--artifacts", fp16_onnx, "--out", q], capfd, [tmp_path], "--force")
    keep = snapshot(q / "other.txt")
    rc, err = run_cli([*base, "--artifacts", fp16_onnx, "--out", q, "--force"], capfd)
    assert rc == 0, err
    assert sorted(p.name for p in q.iterdir()) == ["other.txt", "quality.json", "quality.md", "quality.png"]
    assert (q / "quality.md").read_text() != "my notes" and snapshot(q / "other.txt") == keep
    assert json.loads((q / "quality.json").read_text())["tokens"] == 2


def test_cli_refuses_precision(tiny_onnx, tiny_dir, test_image):
    base = ["chat", "--model", str(tiny_dir), "--backend", "ort", "--artifacts", str(tiny_onnx),
            "--image", str(test_image), "--question", "hi", "--max-new-tokens", "2"]
    for prec, msg in (("fp16", "not exported at precision fp16"), ("fp8", "unknown precision")):
        r = _cli(*base, "--precision", prec)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_load_typed_weightless_inference(tiny_onnx, tmp_path):
    """fp16.load_typed infers types and raises the opset on the weightless proto (full-size graphs are over
    protobuf's 2 GB limit), then loads the weights: the same types and weights as the inline model."""
    from onnx import shape_inference

    from janusflow_trt.export.fp16 import load_typed

    inline = onnx.load(str(tiny_onnx / "llm.onnx"))
    w = {t.name: numpy_helper.to_array(t) for t in inline.graph.initializer}
    want = {v.name: v.type.tensor_type.elem_type for v in shape_inference.infer_shapes(inline).graph.value_info}
    ext = tmp_path / "llm.onnx"
    onnx.save_model(inline, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="llm.onnx.data", size_threshold=0)
    got = load_typed(ext)
    have = {v.name: v.type.tensor_type.elem_type for v in got.graph.value_info}
    assert want and have == want
    assert all(np.array_equal(numpy_helper.to_array(t), w[t.name]) for t in got.graph.initializer)
    assert len(got.graph.initializer) == len(w)
    up = load_typed(ext, 19)
    assert next(o.version for o in up.opset_import if o.domain in ("", "ai.onnx")) == 19
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in up.graph.initializer)
