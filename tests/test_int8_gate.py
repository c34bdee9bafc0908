"""The export's quality gate (janusflow_trt/quality_gate.py) and make-tiny's second initialisation:
the held-out split, the gate's measurements on both initialisations, a broken quantization refused,
an accepted miss flagged and announced once, bad arguments refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from safetensors.numpy import load_file

from janusflow_trt.calibration.data import InputSet, builtin_calibration, builtin_heldout, split_heldout
from janusflow_trt.calibration.record import CalibrationData, Plan
from janusflow_trt.errors import InputError

PLAN = Plan(steps=4, full_runs=2, full_stride=2, early_steps=2)
def _gate(**kw):
    """The gate's CI form: 1 prompt x 3 steps at CFG 2 and 5, 1 pair x 6 tokens; no search (rounds 0)."""
    from janusflow_trt.quality_gate import GATES

    return replace(GATES["quick"], **{"prompts": 1, "photos": 1, "questions": 1, "tokens": 6, "steps": 3,
                                      "rounds": 0, **kw})


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "janusflow_trt.cli", *args], capture_output=True, text=True)


# -- make-tiny --init ------------------------------------------------------------------------------
def test_make_tiny_peaked_init(tiny_dir, tmp_path):
    """--init peaked draws issue 24's distribution (checked per tensor family on the file written);
    --init default is what make-tiny wrote before (1/sqrt(fan_in) matrices, norms near 1)."""
    from janusflow_trt.tiny import make_tiny

    p = load_file(str(make_tiny(tmp_path / "p", init="peaked") / "model.safetensors"))
    d = load_file(str(tiny_dir / "model.safetensors"))  # conftest: make_tiny(size="tiny", seed=0), default init
    lm = "language_model.model."
    std = lambda s, k: float(np.std(s[k]))  # noqa: E731
    assert abs(std(p, lm + "embed_tokens.weight") - 1.0) < 0.02
    assert abs(std(p, lm + "layers.0.self_attn.q_proj.weight") - 0.04) < 0.003
    assert abs(std(p, lm + "layers.1.self_attn.k_proj.weight") - 0.04) < 0.003
    assert abs(std(p, "language_model.lm_head.weight") - 0.1) < 0.003
    for k in (lm + "layers.0.self_attn.v_proj.weight", lm + "layers.0.mlp.down_proj.weight",
              "vision_gen_dec_aligner.weight"):
        assert abs(std(p, k) - 0.02) < 0.002, k
    norm = p[lm + "layers.0.input_layernorm.weight"]
    assert norm.min() >= 0.5 and norm.max() <= 1.5 and norm.std() > 0.2  # U(0.5, 1.5): std 0.29
    assert abs(std(d, lm + "embed_tokens.weight") - 0.5) < 0.02  # default unchanged
    assert abs(std(d, lm + "layers.0.self_attn.q_proj.weight") - 1 / 8) < 0.01  # 1/sqrt(64)
    assert json.loads((tmp_path / "p" / ".janusflow-make-tiny").read_text())["init"] == "peaked"


def test_make_tiny_bad_init(tmp_path):
    r = _cli("make-tiny", str(tmp_path / "x"), "--init", "nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--init" in r.stderr
    assert not (tmp_path / "x").exists()


# -- the held-out split ----------------------------------------------------------------------------
def test_split_heldout_disjoint():
    calib, held = split_heldout(builtin_calibration(), 8, 4, 2)
    assert len(held.prompts) == 8 and len(held.pairs) == 8 and len(calib.prompts) == 56 and len(calib.pairs) == 7
    assert not set(held.prompts) & set(calib.prompts)
    assert not {n for n, _, _ in held.pairs} & {n for n, _, _ in calib.pairs}
    assert len({(n, q) for n, _, q in held.pairs}) == 8  # each held-out photo with 2 different questions
    with pytest.raises(InputError, match="give more calibration inputs"):
        b = builtin_calibration()
        split_heldout(InputSet(b.prompts[:2], b.pairs[:2]), 2, 1, 1)


# -- the gate on an export ---------------------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _run_gate(d, tiny_dir, precisions, gate, accept=False):
    from janusflow_trt.export.specs import build_specs
    from janusflow_trt.janusflow_ref.config import load_config
    from janusflow_trt.quality_gate import run_gate

    cfg = load_config(tiny_dir)
    m = _manifest(d)
    h = builtin_heldout()
    held = InputSet(h.prompts[:gate.prompts], h.pairs[:gate.photos * gate.questions])
    rec = run_gate(d, tiny_dir, cfg, build_specs(cfg), m["graphs"], m, CalibrationData(d / "calib"), held, gate,
                   ["fp32", *precisions], plan=PLAN, accept_miss=accept, progress=False)
    (d / "manifest.json").write_text(json.dumps(m, indent=2))
    return rec, m


def _divide_activation_scales(d, graph, precision, by=100.0):
    """The variant's activation Q/DQ scales divided by `by` (every activation clips), manifest re-hashed."""
    from janusflow_trt.export.manifest import precision_entry

    m = _manifest(d)
    e = m["graphs"][graph]["precisions"][precision]
    q = onnx.load(str(d / e["file"]))
    inits = {t.name: t for t in q.graph.initializer}
    n = 0
    for node in q.graph.node:
        if node.op_type == "QuantizeLinear":  # activations: weights are stored int8, not quantized in-graph
            t = inits[node.input[1]]
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) / by, t.name))
            n += 1
    assert n
    onnx.save(q, str(d / e["file"]))
    new = precision_entry(d, e["file"], None, e["recipe"], e["derived_from"])
    m["graphs"][graph]["precisions"][precision] = {**new, **{k: v for k, v in e.items() if k == "views"}}
    (d / "manifest.json").write_text(json.dumps(m, indent=2))


def test_gate_refuses_broken_scales(int8_onnx, tiny_dir, tmp_path):
    """int8-cpu's LLM with its activation scales / 100 misses and is not written (files gone, the manifest
    without it, one line naming the target); the intact int8 beside it is recorded as measured."""
    from janusflow_trt.export.views import add_views

    d = _copy(int8_onnx, tmp_path / "o")
    _divide_activation_scales(d, "llm", "int8-cpu")
    m = _manifest(d)
    from janusflow_trt.export.specs import build_specs
    from janusflow_trt.janusflow_ref.config import load_config
    add_views(d, m["graphs"], build_specs(load_config(tiny_dir)))  # llm_gen.int8-cpu follows the broken file
    (d / "manifest.json").write_text(json.dumps(m, indent=2))
    broken_file = m["graphs"]["llm"]["precisions"]["int8-cpu"]["file"]
    rec, m = _run_gate(d, tiny_dir, ["int8", "int8-cpu"], _gate())
    bad = rec["precisions"]["int8-cpu"]
    assert not bad["met"] and not bad["written"], bad
    missed = [c for c in bad["figures"]["checks"] if not c["met"]]
    assert any(c["target"] == "chat_top1_teacher_forced" or c["target"].startswith("graph_cosine:llm") for c in missed)
    assert not (d / broken_file).exists() and all("int8-cpu" not in g.get("precisions", {})
                                                    for g in m["graphs"].values())
    assert (d / m["graphs"]["llm"]["file"]).exists()  # FP32 kept
    assert bad["miss"].startswith("int8-cpu: quality gate missed ") and "(by " in bad["miss"], bad["miss"]
    assert "\n" not in bad["miss"]  # the one line `janusflow export` prints for it
    good = rec["precisions"]["int8"]  # intact: kept or refused as measured (tiny int8 misses PSNR at CFG 5)
    assert good["met"] == all(c["met"] for c in good["figures"]["checks"]) and good["written"] == good["met"]
    assert ("int8" in m["graphs"]["llm"].get("precisions", {})) == good["met"]
    assert {"llm", "siglip", "gen_dec"} <= set(good["figures"]["graphs"])
    assert set(good["figures"]["t2i"]) == {"2", "5"}


def test_accepted_miss_flagged_and_announced_once(int8_onnx, tiny_dir, tmp_path, capsys):
    """--accept-quality-miss keeps the missing variant, flags it, the runtime says so once per load of
    the variant, and verify fails it."""
    from janusflow_trt.export import verify as V
    from janusflow_trt.janusflow_ref.config import load_config
    from janusflow_trt.runtime.factory import make_backend

    d = _copy(int8_onnx, tmp_path / "o")
    _divide_activation_scales(d, "llm", "int8-cpu")
    m = _manifest(d)
    from janusflow_trt.export.specs import build_specs
    from janusflow_trt.export.views import add_views
    add_views(d, m["graphs"], build_specs(load_config(tiny_dir)))
    (d / "manifest.json").write_text(json.dumps(m, indent=2))
    rec, m = _run_gate(d, tiny_dir, ["int8-cpu"], _gate(), accept=True)
    r = rec["precisions"]["int8-cpu"]
    assert r["written"] and r["accepted_miss"] and not r["met"]
    capsys.readouterr()
    cfg = load_config(tiny_dir)
    for _ in range(2):
        make_backend("ort", tiny_dir, d, cfg, precision="int8-cpu")
    make_backend("ort", tiny_dir, d, cfg, precision="fp32")
    warned = [x for x in capsys.readouterr().err.splitlines() if "--accept-quality-miss" in x]
    assert len(warned) == 1 and "int8-cpu" in warned[0], warned
    assert not V.verify(tiny_dir, d, None, print_table=False, precision="int8-cpu").ok


def test_bad_gate_args(tiny_dir, tmp_path):
    """An unknown --gate: argparse's one line, exit 2. A partial export with an int8 precision: the gate
    cannot run the pipeline, refused before anything is written (the CLI turns it into one line, exit 2)."""
    from janusflow_trt.errors import JanusFlowError
    from janusflow_trt.export_job import export_graphs

    out = tmp_path / "out"
    r = _cli("export", "--model", str(tiny_dir), "--out", str(out), "--gate", "nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--gate" in r.stderr, r.stderr
    with pytest.raises(JanusFlowError, match="quality gate runs the whole pipeline"):
        export_graphs(tiny_dir, None, out, graphs="llm", precisions="fp32,int8", progress=False, gate=_gate())
    assert not out.exists()


# -- the whole export with its gate, on both initialisations (slow: run by hand) -----------------------
@pytest.mark.slow
@pytest.mark.parametrize("init", ["default", "peaked"])
def test_export_gate_both_inits(init, tmp_path):
    """`janusflow export --precision fp32,fp16,int8,int8-cpu --gate quick --calib-plan lean` (the commands of
    docs/precision.md's gate table, ~12 min each on the shared 2-core machine): every variant either meets
    every target (recorded) or is not written, with one line each; exit 1 iff one was refused."""
    from janusflow_trt.tiny import make_tiny

    ck = make_tiny(tmp_path / "ck", init=init)
    out = tmp_path / "o"
    r = _cli("export", "--model", str(ck), "--out", str(out), "--precision", "fp32,fp16,int8,int8-cpu",
             "--gate", "quick", "--calib-plan", "lean", "--quiet")
    m = _manifest(out)
    g = m["quality_gate"]["precisions"]
    refused = [p for p, x in g.items() if not x["written"]]
    assert r.returncode == (1 if refused else 0), r.stderr
    for p, x in g.items():
        assert x["met"] == all(c["met"] for c in x["figures"]["checks"])
        assert x["written"] == x["met"]
        assert (p in m["graphs"]["llm"].get("precisions", {})) == x["written"]
    assert len([x for x in r.stderr.splitlines() if x.startswith("not written:")]) == len(refused)
    # the recording was handed the calibration part only: the gate's held-out inputs were never recorded
    from janusflow_trt.quality_gate import GATES, split

    calib, _ = split(builtin_calibration(), GATES["quick"])
    assert json.loads((out / "calib" / "index.json").read_text())["inputs_sha256"] == calib.sha256()


# -- the exclusion search's probes on a graph with external weights --------------------------------------
def _llm_inline_and_external(int8_onnx, tiny_dir, tmp_path):
    """(the llm spec, the export's calibration set, its inline FP32 llm file, the same graph saved with its
    weights in llm.onnx.data, as the full-size LLM past 2 GB is)."""
    from janusflow_trt.export.specs import build_specs
    from janusflow_trt.janusflow_ref.config import load_config

    spec = build_specs(load_config(tiny_dir))["llm"]
    src = int8_onnx / _manifest(int8_onnx)["graphs"]["llm"]["file"]
    ext = tmp_path / "llm.onnx"
    onnx.save_model(onnx.load(str(src)), str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="llm.onnx.data")
    return spec, CalibrationData(int8_onnx / "calib"), src, ext


def test_rank_nodes_external_weights(int8_onnx, tiny_dir, tmp_path, monkeypatch):
    """rank_nodes on the tiny LLM forced to external data (its weights in llm.onnx.data, as the full-size
    LLM past 2 GB) ranks the same nodes with the same cosines as on the inline file, and no probe session is
    opened from serialised bytes holding the weights (the inline path's SerializeToString would fail above
    protobuf's 2 GB at full size)."""
    import onnxruntime as ort

    from janusflow_trt.export import int8_sensitivity as S
    spec, calib, src, ext = _llm_inline_and_external(int8_onnx, tiny_dir, tmp_path)
    weight_bytes = (tmp_path / "llm.onnx.data").stat().st_size
    opened: list[int] = []
    real = ort.InferenceSession

    def spy(model, *a, **kw):  # the real session (every one opened, probes and calibration); the bytes passed
        opened.append(len(model) if isinstance(model, bytes) else 0)
        return real(model, *a, **kw)

    args = (spec, calib, "int8-cpu", None, 8, 2)
    inline = S.rank_nodes(src, *args, outputs=["logits"])
    monkeypatch.setattr(S.ort, "InferenceSession", spy)
    external = S.rank_nodes(ext, *args, outputs=["logits"])
    assert len(opened) > len(external) and max(opened) < weight_bytes / 10, (opened, weight_bytes)
    assert [r["node"] for r in external] == [r["node"] for r in inline] and len(inline) > 5
    for a, b in zip(inline, external, strict=True):
        assert abs(a["cosine_alone"] - b["cosine_alone"]) < 1e-6 and a["weight_bytes"] == b["weight_bytes"], (a, b)
    assert inline[0]["cosine_alone"] < inline[-1]["cosine_alone"]  # the probes differ: a ranking, not a constant


def test_rank_nodes_probes_the_largest_outlier_ratios(int8_onnx, tiny_dir, tmp_path, monkeypatch):
    """rank_nodes(probes=k) (the full-size preset's bounded search) probes only the k quantized nodes whose
    activation input has the largest outlier ratio in the float graph the probes start from, with the same
    cosines as probing every node; inline and external-weights graphs choose the same nodes."""
    from janusflow_trt.export import int8_sensitivity as S
    spec, calib, src, ext = _llm_inline_and_external(int8_onnx, tiny_dir, tmp_path)
    args = (spec, calib, "int8-cpu", None, 8, 2)
    every = {r["node"]: r for r in S.rank_nodes(src, *args, outputs=["logits"])}
    seen: list[dict[str, float]] = []
    real = S.outlier_ratios
    monkeypatch.setattr(S, "outlier_ratios", lambda path, feeds: seen.append(real(path, feeds)) or seen[-1])
    k = 3
    for path in (src, ext):
        some = S.rank_nodes(path, *args, outputs=["logits"], probes=k)
        ratios = {n: v for n, v in seen[-1].items() if n in every}
        assert set(ratios) == set(every)  # a ratio for every quantized node
        top = sorted(ratios, key=lambda n: -ratios[n])[:k]
        assert ratios[top[-1]] > sorted(ratios.values(), reverse=True)[k]  # no tie at the cut
        assert sorted(r["node"] for r in some) == sorted(top), path
        for r in some:
            assert r["probed_of"] == [k, len(every)] and r["outlier_ratio"] == ratios[r["node"]]
            assert abs(r["cosine_alone"] - every[r["node"]]["cosine_alone"]) < 1e-6, r
    assert len(seen) == 2


def test_rank_nodes_starts_from_the_exported_variant(int8_onnx, tiny_dir, tmp_path, monkeypatch):
    """rank_nodes handed the int8-cpu variant already derived with its recipe (derived=, what the gate passes
    from the export) probes from a copy of it without calibrating again, and ranks the same nodes with the
    same cosines as its own derivation: on the export's inline file (recipe read back from the manifest) and
    on a graph with external weights (the full-size LLM's case: derived here as the export does)."""
    from test_int8 import PLAN

    from janusflow_trt.export import int8_sensitivity as S
    spec, calib, src, ext = _llm_inline_and_external(int8_onnx, tiny_dir, tmp_path)
    v = _manifest(int8_onnx)["graphs"]["llm"]["precisions"]["int8-cpu"]
    args = (spec, calib, "int8-cpu", None, PLAN.measure_samples, 2)
    own = {"inline": S.rank_nodes(src, *args, outputs=["logits"]),
           "external": S.rank_nodes(ext, *args, outputs=["logits"])}
    made = S.derive_int8(ext, spec, calib, tmp_path / "llm.int8-cpu.onnx", "int8-cpu", limit=PLAN.measure_samples,
                         big=True)
    monkeypatch.setattr(S, "derive_int8", lambda *a, **k: pytest.fail("calibrated again"))
    given = {"inline": S.rank_nodes(src, *args, outputs=["logits"], derived=(int8_onnx / v["file"], v["recipe"])),
             "external": S.rank_nodes(ext, *args, outputs=["logits"],
                                      derived=(tmp_path / "llm.int8-cpu.onnx", made["recipe"]))}
    for k in own:
        assert [r["node"] for r in given[k]] == [r["node"] for r in own[k]] and len(own[k]) > 5, k
        for a, b in zip(own[k], given[k], strict=True):
            assert abs(a["cosine_alone"] - b["cosine_alone"]) < 1e-7, (k, a, b)
            assert a["weight_bytes"] == b["weight_bytes"], (k, a, b)
    assert (tmp_path / "llm.int8-cpu.onnx").is_file()  # probed from a copy: the variant given stays


@pytest.mark.slow  # ~70 s on the shared machine: the search ranks llm, siglip, gen_dec and gen_enc
def test_search_records_exclusion_speed(int8_onnx, tiny_dir, tmp_path):
    """One round of the exclusion search on the clipped int8-cpu LLM: the node kept float is recorded with
    the graph's time before and after it on the gate's recorded inputs (timed alternately in the gate), and
    `verify` / `quality` print it (export/manifest.py: gate_lines); the re-derived graph's recipe says why
    the node is float."""
    from janusflow_trt.export.manifest import gate_lines
    from janusflow_trt.export.specs import build_specs
    from janusflow_trt.export.views import add_views
    from janusflow_trt.janusflow_ref.config import load_config

    d = _copy(int8_onnx, tmp_path / "o")
    _divide_activation_scales(d, "llm", "int8-cpu")
    m = _manifest(d)
    add_views(d, m["graphs"], build_specs(load_config(tiny_dir)))
    (d / "manifest.json").write_text(json.dumps(m, indent=2))
    rec, m = _run_gate(d, tiny_dir, ["int8-cpu"], _gate(rounds=1, rank_samples=1), accept=True)
    (e,) = rec["precisions"]["int8-cpu"]["exclusions"]
    assert e["graph_ms_before"] > 0 and e["graph_ms_after"] > 0, e
    # the record rounds the times to 1e-3 ms and the ratio (of the unrounded times) to 1e-4: within that
    a, b = e["graph_ms_after"], e["graph_ms_before"]
    assert abs(e["graph_time_ratio"] - a / b) <= 5e-5 + 5e-4 / b * (1 + a / b) + 1e-9, e
    recipe = m["graphs"][e["graph"]]["precisions"]["int8-cpu"]["recipe"]
    assert recipe["excluded"][e["node"]].startswith("quality gate:"), recipe["excluded"]
    line = next(x for x in gate_lines(m, "int8-cpu") if "kept float by the gate's search" in x)
    assert f"{e['graph']}:{e['node']}" in line and f"(x{e['graph_time_ratio']:.2f})" in line, line
    assert f"{e['graph_ms_before']:.1f} -> {e['graph_ms_after']:.1f} ms" in line, line
