"""torch -> checked ONNX: each graph of export/graphs.py exported (dynamo first, the legacy exporter as
fallback), then checked on the ONNX side (dims named as the spec, checker, shape inference, onnxslim kept
only if ONNX Runtime's outputs still match, the op set against the TensorRT parser); export_fp32 does all
the asked graphs into a directory, in two phases so that the torch modules are freed before the checks.

Memory: the checkpoint's graphs are traced with fake parameters and their weights streamed from the
safetensors into the external-data file (export/streamed.py: the weights are never all in memory); a
graph above the protobuf limit is then checked without loading its weights into Python (renaming,
GELU form, onnxslim on the weightless proto, checker and shape inference on the file); only ONNX
Runtime's parity runs hold them, one session at a time. `streamed=False` is the inline export (the real
modules traced; the reference of tests/test_streamed_export.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxslim
import torch
from torch.export import Dim
from tqdm import tqdm

from janusflow_trt.errors import JanusFlowError
from janusflow_trt.files import os_error_in
from janusflow_trt.janusflow_ref.config import JanusFlowConfig, load_config
from janusflow_trt.janusflow_ref.vae import load_vae, resolve_vae_dir
from janusflow_trt.janusflow_ref.weights import load_model

from . import graphs as G
from .manifest import graph_entry
from .memory import PeakRSS, release_memory
from .onnx_graph import gelu_ort_form, graph_opset, hide_external_initializers, restore_initializers
from .onnx_io import initializer_bytes, load_weights, needs_external_data, ort_session, save_graph, save_model
from .patches import export_patches
from .specs import GRAPH_NAMES, GraphSpec, build_specs, compare, dummy_inputs
from .streamed import STREAMED_GRAPHS, CheckpointTensors, attach_weights, fake_model, graph_keys, save_streamed
from .trt_ops import OPERATORS_MD, graph_ops, unsupported_ops

MIN_OPSET, MAX_OPSET = 18, 21  # dynamo exports 18+; below it onnxscript's down-converter fails
log = logging.getLogger(__name__)


class ExportError(JanusFlowError):
    """An exported graph failed a check (unsupported op, checker, parity after simplification)."""


# -- inputs ------------------------------------------------------------------------------------------
def parse_graphs(graphs: str | list[str] | None) -> list[str]:
    if graphs is None:
        return list(GRAPH_NAMES)
    names = [g.strip() for g in (graphs.split(",") if isinstance(graphs, str) else graphs) if g.strip()]
    bad = [g for g in names if g not in GRAPH_NAMES]
    if bad or not names:
        raise JanusFlowError(f"unknown graph {bad[0] if bad else '(none)'!r}; choose from {','.join(GRAPH_NAMES)}")
    return [g for g in GRAPH_NAMES if g in names]


def resolve_vae(model_dir: str | Path, vae_dir: str | Path | None, needed: bool) -> Path | None:
    """The VAE folder (janusflow_ref.vae.resolve_vae_dir: --vae, else MODEL/vae), or None where neither is
    there and no graph needs it."""
    if vae_dir is None and not needed and not (Path(model_dir) / "vae").is_dir():
        return None
    return resolve_vae_dir(model_dir, vae_dir)


GRAPH_MODULES: dict[str, type[torch.nn.Module]] = {  # the JanusFlow model's graphs (vae_dec wraps the VAE)
    "siglip": G.SigLIPGraph, "embed": G.EmbedGraph, "llm": G.LLMGraph, "gen_enc": G.GenEncGraph,
    "gen_dec": G.GenDecGraph}


def load_modules(model_dir: str | Path, vae_dir: str | Path | None, names: list[str]):
    """-> (cfg, {graph: eval-mode torch module}) in float32."""
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    mods: dict[str, torch.nn.Module] = {}
    if any(n != "vae_dec" for n in names):
        m = load_model(model_dir)
        mods.update({n: GRAPH_MODULES[n](m).eval() for n in names if n in GRAPH_MODULES})
    if "vae_dec" in names:
        mods["vae_dec"] = G.VAEDecGraph(load_vae(resolve_vae(model_dir, vae_dir, True))).eval()
    return cfg, mods


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise JanusFlowError(f"--opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET} "
                             f"(the dynamo exporter writes opset {MIN_OPSET} and newer)")


# -- one graph -------------------------------------------------------------------------------------
def _dynamic_shapes(spec: GraphSpec) -> tuple:
    """torch.export.Dim per independent symbol; derived ones (M = C + S) are left to export to infer."""
    dims: dict[str, Any] = {}
    for n, s in spec.syms.items():
        if s.sum_of:
            dims[n] = Dim.DYNAMIC
        elif s.multiple_of > 1:  # B = 2 * B_div: the CFG halves split evenly
            dims[n] = s.multiple_of * Dim(f"{n}_div", min=max(1, s.min // s.multiple_of), max=s.max // s.multiple_of)
        else:
            dims[n] = Dim(n, min=s.min, max=s.max)
    per_input = tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs)
    if spec.name == "llm":  # LLMGraph.forward(inputs_embeds, attention_mask, position_ids, *past)
        return (*per_input[:3], per_input[3:])
    return per_input


def _dynamic_axes(spec: GraphSpec) -> dict[str, dict[int, str]]:
    return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs + spec.outputs}


def export_dynamo(module, spec: GraphSpec, args: tuple, path: Path, opset: int, big: bool) -> None:
    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset, input_names=spec.input_names,
                      output_names=spec.output_names, dynamic_shapes=_dynamic_shapes(spec), external_data=big,
                      optimize=True, verbose=False)


def export_streamed(module, spec: GraphSpec, args: tuple, path: Path, opset: int,
                    weights: tuple[dict[str, str], CheckpointTensors]) -> None:
    """`module` holds fake parameters: trace unoptimised, attach the checkpoint's tensors lazily, run the
    optimiser torch.onnx.export(optimize=True) runs, write the weights one tensor at a time."""
    prog = torch.onnx.export(module, args, None, dynamo=True, opset_version=opset, input_names=spec.input_names,
                             output_names=spec.output_names, dynamic_shapes=_dynamic_shapes(spec), optimize=False,
                             verbose=False)
    attach_weights(prog.model, *weights)
    prog.optimize()
    save_streamed(prog.model, path)


def export_legacy(module, spec: GraphSpec, args: tuple, path: Path, opset: int, big: bool) -> None:
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=spec.input_names,
                      output_names=spec.output_names, dynamic_axes=_dynamic_axes(spec), do_constant_folding=True)


def _rename_dims(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Graph I/O dims get the spec's symbol names (dynamo writes e.g. '2*B_div' or 's53')."""
    rename: dict[str, str] = {}
    vis = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    for t in spec.inputs + spec.outputs:
        for d, want in zip(vis[t.name].type.tensor_type.shape.dim, t.shape, strict=True):
            if isinstance(want, str):
                if d.dim_param and d.dim_param != want:
                    rename[d.dim_param] = want
                d.dim_param = want
    # Intermediate shapes from dynamo use its own symbols inside expressions (e.g. 'Max(0, s53 - C)'),
    # which no longer match the renamed I/O; drop them and let ONNX shape inference redo them.
    del model.graph.value_info[:]


def _run(path: Path, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort_session(path, lean=True).run(spec.output_names, feeds)


def check_ops(model: onnx.ModelProto, spec: GraphSpec) -> list[str]:
    bad = unsupported_ops(model)
    if bad:
        raise ExportError(f"graph {spec.name}: op {bad[0]} is not supported by the TensorRT ONNX parser "
                          f"(all unsupported: {', '.join(bad)}; list: {OPERATORS_MD.name})")
    return graph_ops(model)


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs one warning per missing optional op library (torchvision) per graph."""
    lg = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def export_one(name: str, module, spec: GraphSpec, tmp: Path, opset: int, force_legacy: bool = False,
               weights: tuple[dict[str, str], CheckpointTensors] | None = None) -> dict | None:
    """torch -> tmp/name.onnx (raw exporter output); -> {"exporter", ["dynamo_error"]}. weights: `module`
    holds fake parameters (export/streamed.py), (initializer -> checkpoint key, the checkpoint); then
    dynamo only, and a failure returns None: the caller exports the real module instead."""
    path = tmp / f"{name}.onnx"
    feeds = dummy_inputs(spec, seed=1)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    if weights is not None:
        with export_patches(), torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            try:
                export_streamed(module, spec, args, path, opset, weights)
            except Exception as e:
                if os_error_in(e) is not None:
                    raise
                log.warning("graph %s: streamed export failed (%s: %s); exporting the loaded module", name,
                            type(e).__name__, str(e).strip().splitlines()[0][:300] if str(e).strip() else "")
                for f in tmp.glob(f"{name}.onnx*"):
                    f.unlink()
                return None
        return {"exporter": "dynamo", "streamed": True}
    # the modules hold the whole model; the graph's own size is known only after export, so dynamo
    # always writes external data first (no 2 GiB protobuf limit), and finish_one decides
    big_module = needs_external_data(sum(p.numel() * p.element_size() for p in module.parameters()))
    exporter, fallback_reason = "dynamo", None
    with export_patches(), torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            if force_legacy:
                raise RuntimeError("legacy exporter forced")
            export_dynamo(module, spec, args, path, opset, True)
        except Exception as e:  # any dynamo failure: the legacy TorchScript exporter gets a go
            if os_error_in(e) is not None:  # a full disk is no exporter failure: the caller reports it
                raise
            fallback_reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            log.warning("graph %s: dynamo export failed (%s); falling back to the legacy exporter", name,
                        fallback_reason)
            for f in tmp.glob(f"{name}.onnx*"):
                f.unlink()
            exporter = "legacy"
            try:
                export_legacy(module, spec, args, path, opset, big_module)
            except Exception as e2:
                raise ExportError(f"graph {name}: dynamo export failed ({fallback_reason}) and the legacy "
                                  f"exporter failed too ({type(e2).__name__}: {str(e2).strip()[:300]})") from e2
    info = {"exporter": exporter}
    if fallback_reason:
        info["dynamo_error"] = fallback_reason
    return info


def finish_one(name: str, spec: GraphSpec, tmp: Path, opset: int) -> dict:
    """ONNX-side work on tmp/name.onnx (no torch model needed): rename dims, check, infer shapes,
    simplify + re-check, TensorRT op check; -> manifest fields."""
    path = tmp / f"{name}.onnx"
    feeds = dummy_inputs(spec, seed=1)
    model = onnx.load(str(path), load_external_data=False)
    real = graph_opset(model)
    if real != opset:  # an exporter that quietly kept another opset would make the manifest lie
        raise ExportError(f"graph {name}: the exporter wrote opset {real}, not the requested {opset}")
    big = needs_external_data(initializer_bytes(model))
    if not big:  # stored inline: its weights come into the proto
        load_weights(model, tmp)
    _rename_dims(model, spec)
    gelus = gelu_ort_form(model)
    # big: the graph alone is rewritten; its weights stay where the exporter put them (a full-size LLM
    # proto with its weights is ~6 GB, and serialising it takes as much again)
    data = save_graph(model, path) if big else save_model(model, path, False)
    del model
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    before = _run(path, spec, feeds)
    simplified = _simplify(path, spec, feeds, before, big)
    model = onnx.load(str(path), load_external_data=False)
    ops = check_ops(model, spec)
    return {"data": data, "simplified": simplified, "ops": ops, "nodes": len(model.graph.node), "gelu_ort_form": gelus,
            "opset": graph_opset(model)}


def _slim(path: Path, big: bool) -> onnx.ModelProto:
    """onnxslim on the file; big: on the weightless proto, the external weights shown to it as graph inputs
    (it reads every initializer's values; folding into a weight this large is the exporter's job, which
    did it: tests/test_streamed_export.py compares the result with onnxslim on the loaded graph)."""
    if not big:
        return onnxslim.slim(onnx.load(str(path)))
    model = onnx.load(str(path), load_external_data=False)
    hidden = hide_external_initializers(model)
    slim = onnxslim.slim(model)
    restore_initializers(slim, hidden)
    return slim


def _simplify(path: Path, spec: GraphSpec, feeds, before: list[np.ndarray], big: bool) -> bool | str:
    """onnxslim; kept only if it passes the checker and ORT outputs match the unsimplified graph."""
    try:
        slim = _slim(path, big)
    except Exception as e:  # a simplifier bug must not lose a valid export
        if os_error_in(e) is not None:
            raise
        return f"skipped: onnxslim failed ({type(e).__name__})"
    # onnxslim's symbolic shape inference can get broadcasts wrong (seen: And of [B,1,1,M-C] and
    # [1,1,S,S] annotated [B,4,S,S], which the checker rejects); its annotations are only hints, so
    # drop them and let ONNX infer again. The nodes themselves are checked by the ORT parity below.
    del slim.graph.value_info[:]
    # the candidate sits beside the graph under another name: inline (small), or reading the graph's
    # own data file (big; its initializers name that file, whatever the candidate is called)
    cand = path.with_name(f".slim.{path.name}")
    if big:
        save_graph(slim, cand, path.name + ".data")
    else:
        save_model(slim, cand, False)
    del slim
    try:
        onnx.checker.check_model(str(cand), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(cand), str(cand))
        after = _run(cand, spec, feeds)
        for t, a, b in zip(spec.outputs, after, before, strict=True):
            r = compare(a, b, t.tol)
            if not r["ok"]:
                raise ExportError(f"graph {spec.name}: output {t.name} changed after simplification "
                                  f"(max abs {r['max_abs']:.3g}, cosine {r['cosine']:.8f})")
    except Exception as e:  # checker / ORT / parity: the simplified graph is not trusted
        if os_error_in(e) is not None:
            raise
        e = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        log.warning("graph %s: simplified graph rejected (%s); keeping the unsimplified graph", spec.name, e)
        cand.unlink()
        return f"rejected: {e}"
    os.replace(cand, path)
    return True


# -- all graphs ------------------------------------------------------------------------------------
def export_fp32(model_dir: Path, vae_dir: Path | None, out: Path, names: list[str], opset: int,
                force_legacy: tuple[str, ...] = (), progress: bool = True, streamed: bool = True
                ) -> tuple[JanusFlowConfig, dict[str, GraphSpec], dict[str, dict[str, Any]]]:
    """out/<graph>.onnx for each of `names`; -> (cfg, specs, {graph: manifest entry}). force_legacy: graphs
    that skip dynamo (and streaming). streamed: the checkpoint's graphs traced with fake parameters, their
    weights streamed from the safetensors (False: the inline export of the loaded modules). Phase 1 needs
    the torch modules; phase 2 (checks, ORT, simplification) runs after they are freed."""
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    specs = build_specs(cfg)
    fake = [n for n in names if streamed and n in STREAMED_GRAPHS and n not in force_legacy]
    mods: dict[str, torch.nn.Module] = {}
    weights: dict[str, tuple[dict[str, str], CheckpointTensors]] = {}
    if fake:
        ckpt = CheckpointTensors(model_dir, cfg)
        jf, keys = fake_model(cfg)
        mods = {n: GRAPH_MODULES[n](jf).eval() for n in fake}
        weights = {n: (graph_keys(mods[n], keys), ckpt) for n in fake}
        del jf
    if len(fake) < len(names):
        mods.update(load_modules(model_dir, vae_dir, [n for n in names if n not in fake])[1])
    entries: dict[str, dict] = {}
    bar = tqdm(names, desc="export", unit="graph", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            info = export_one(name, mods[name], specs[name], out, opset, name in force_legacy, weights.get(name))
            if info is None:  # the streamed export failed (logged): the real module, loaded for this graph only
                mods[name] = load_modules(model_dir, vae_dir, [name])[1][name]
                info = export_one(name, mods[name], specs[name], out, opset, name in force_legacy)
            del mods[name]
        assert info is not None
        entries[name] = info
        entries[name].update(export_seconds=round(time.perf_counter() - t0, 2), export_peak_rss_mb=rss.peak_mb,
                             export_start_rss_mb=rss.start_mb)
        release_memory()
    del mods, weights
    release_memory()
    bar = tqdm(names, desc="check", unit="graph", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            info = finish_one(name, specs[name], out, opset)
        e = entries[name]
        e.update(info, check_seconds=round(time.perf_counter() - t0, 2), check_peak_rss_mb=rss.peak_mb,
                 check_start_rss_mb=rss.start_mb)
        release_memory()
        e.update(seconds=round(e["export_seconds"] + e["check_seconds"], 2),
                 peak_rss_mb=max(e["export_peak_rss_mb"], e["check_peak_rss_mb"]))
        data = e.pop("data")
        entries[name] = graph_entry(specs[name], f"{name}.onnx", data, out, e.pop("opset"), e)
    return cfg, specs, entries
