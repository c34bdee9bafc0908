"""Export the graphs of export/graphs.py to ONNX (dynamo first, legacy exporter as fallback), check,
simplify, re-verify the simplified graph, check the op set against the TensorRT parser, and write
OUT atomically with manifest.json."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from janusflow_trt.errors import CheckpointError, JanusFlowError
from janusflow_trt.files import check_out_dir, make_tmp, replace_dir
from janusflow_trt.janusflow_ref.config import JanusFlowConfig, load_config

from . import graphs as G
from .manifest import build_manifest, graph_entry, write_manifest
from .onnx_graph import graph_opset, tensor_readers
from .patches import export_patches
from .specs import GRAPH_NAMES, GraphSpec, build_specs, compare, dummy_inputs
from .trt_ops import OPERATORS_MD, graph_ops, unsupported_ops

MIN_OPSET, MAX_OPSET = 18, 21  # dynamo exports 18+; below it onnxscript's down-converter fails
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; keep a margin for the graph itself
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


def resolve_vae(model_dir: Path, vae_dir: str | Path | None, needed: bool) -> Path | None:
    if vae_dir is not None:
        return Path(vae_dir)
    if (model_dir / "vae").is_dir():
        return model_dir / "vae"
    if needed:
        raise CheckpointError(f"no --vae given and {model_dir / 'vae'} does not exist (needed for vae_dec)")
    return None


def load_modules(model_dir: str | Path, vae_dir: str | Path | None, names: list[str]):
    """-> (cfg, {graph: eval-mode torch module}) in float32."""
    from janusflow_trt.janusflow_ref.vae import load_vae
    from janusflow_trt.janusflow_ref.weights import load_model

    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    mods: dict[str, torch.nn.Module] = {}
    if any(n != "vae_dec" for n in names):
        m = load_model(model_dir)
        ctors = {"siglip": G.SigLIPGraph, "embed": G.EmbedGraph, "llm": G.LLMGraph, "gen_enc": G.GenEncGraph,
                 "gen_dec": G.GenDecGraph}
        mods.update({n: ctors[n](m).eval() for n in names if n in ctors})
    if "vae_dec" in names:
        mods["vae_dec"] = G.VAEDecGraph(load_vae(resolve_vae(model_dir, vae_dir, True))).eval()
    return cfg, mods


# -- one graph -------------------------------------------------------------------------------------
def _dynamic_shapes(spec: GraphSpec) -> tuple:
    """torch.export.Dim per independent symbol; derived ones (M = C + S) are left to export to infer."""
    from torch.export import Dim

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


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer)


def _save(model: onnx.ModelProto, path: Path, big: bool) -> str | None:
    data = path.name + ".data"
    (path.parent / data).unlink(missing_ok=True)
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                        size_threshold=1024)
        return data
    onnx.save_model(model, str(path))
    return None


def ort_session(path: Path | str, threads: int = 0, lean: bool = False):
    """CPU session; lean: no weight prepacking / arena (export-time checks of multi-GB graphs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if lean:
        so.enable_cpu_mem_arena = False
        so.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path: Path, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort_session(path, lean=True)
    return sess.run(spec.output_names, feeds)


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


def _export_one(name: str, module, spec: GraphSpec, tmp: Path, opset: int, force_legacy: bool = False) -> dict:
    """torch -> tmp/name.onnx (raw exporter output); -> {"exporter", ["dynamo_error"]}."""
    path = tmp / f"{name}.onnx"
    feeds = dummy_inputs(spec, seed=1)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    # the modules hold the whole model; the graph's own size is known only after export, so dynamo
    # always writes external data first (no 2 GiB protobuf limit), and _save decides below
    big_module = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    exporter, fallback_reason = "dynamo", None
    with export_patches(), torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            if force_legacy:
                raise RuntimeError("legacy exporter forced")
            export_dynamo(module, spec, args, path, opset, True)
        except Exception as e:  # any dynamo failure: the legacy TorchScript exporter gets a go
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


def gelu_ort_form(model: onnx.ModelProto) -> int:
    """Exact GELU as exported, x * (0.5 * (1 + erf(x / sqrt2))), reordered to (x * (1 + erf(x / sqrt2))) * 0.5:
    the form ONNX Runtime's GeluFusion matches (its "pattern 2"), so the five element-wise passes become one
    fused kernel on the CPU (small preset: gen_enc 11.3 -> 10.2 ms, gen_dec 30.8 -> 29.2 ms, int8-cpu 8.4 ->
    7.2 / 17.3 -> 15.3 ms). Bit-identical before fusion: scaling by 0.5 is exact, so where it is applied
    does not change a single rounding. -> the number of GELUs rewritten."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    readers = tensor_readers(model.graph)
    consts = {t.name: t for t in model.graph.initializer}
    consts.update({n.output[0]: next(a.t for a in n.attribute if a.name == "value") for n in nodes
                   if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute)})

    def scalar(name: str) -> float | None:
        t = consts.get(name)
        if t is None or int(np.prod(t.dims)) != 1:
            return None
        return float(onnx.numpy_helper.to_array(t).reshape(()))

    done = 0
    for erf in nodes:
        if erf.op_type != "Erf":
            continue
        div, (add, *more) = producer.get(erf.input[0]), readers.get(erf.output[0], [None])
        if div is None or div.op_type != "Div" or more or add is None or add.op_type != "Add":
            continue
        one = [i for i in add.input if i != erf.output[0]]
        half_mul = readers.get(add.output[0], [])
        if len(one) != 1 or scalar(one[0]) != 1.0 or len(half_mul) != 1 or half_mul[0].op_type != "Mul":
            continue
        m1 = half_mul[0]
        half = [i for i in m1.input if i != add.output[0]]
        outer = readers.get(m1.output[0], [])
        x = div.input[0]
        if len(half) != 1 or scalar(half[0]) != 0.5 or len(outer) != 1 or outer[0].op_type != "Mul" \
                or sorted(outer[0].input) != sorted([x, m1.output[0]]):
            continue
        m1.input[:] = [x, add.output[0]]  # x * (1 + erf)
        outer[0].input[:] = [m1.output[0], half[0]]  # ... * 0.5
        done += 1
    return done


def _finish_one(name: str, spec: GraphSpec, tmp: Path, opset: int) -> dict:
    """ONNX-side work on tmp/name.onnx (no torch model needed): rename dims, check, infer shapes,
    simplify + re-check, TensorRT op check; -> manifest fields."""
    path = tmp / f"{name}.onnx"
    feeds = dummy_inputs(spec, seed=1)
    model = onnx.load(str(path))
    real = graph_opset(model)
    if real != opset:  # an exporter that quietly kept another opset would make the manifest lie
        raise ExportError(f"graph {name}: the exporter wrote opset {real}, not the requested {opset}")
    big = initializer_bytes(model) > EXTERNAL_DATA_BYTES
    _rename_dims(model, spec)
    gelus = gelu_ort_form(model)
    data = _save(model, path, big)
    del model  # a full-size LLM proto is ~6 GB: do not hold it while ORT loads the file
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    before = _run(path, spec, feeds)
    simplified = _simplify(path, spec, feeds, before, big)
    model = onnx.load(str(path), load_external_data=False)
    ops = check_ops(model, spec)
    return {"data": data, "simplified": simplified, "ops": ops, "nodes": len(model.graph.node), "gelu_ort_form": gelus,
            "opset": graph_opset(model)}


def _simplify(path: Path, spec: GraphSpec, feeds, before: list[np.ndarray], big: bool) -> bool | str:
    """onnxslim; kept only if it passes the checker and ORT outputs match the unsimplified graph."""
    import onnxslim

    try:
        slim = onnxslim.slim(onnx.load(str(path)))
    except Exception as e:  # a simplifier bug must not lose a valid export
        return f"skipped: onnxslim failed ({type(e).__name__})"
    # onnxslim's symbolic shape inference can get broadcasts wrong (seen: And of [B,1,1,M-C] and
    # [1,1,S,S] annotated [B,4,S,S], which the checker rejects); its annotations are only hints, so
    # drop them and let ONNX infer again. The nodes themselves are checked by the ORT parity below.
    del slim.graph.value_info[:]
    # the candidate goes to a side folder under the same file name, so its external-data reference
    # stays valid when it is renamed into place
    side = path.parent / ".slim"
    side.mkdir(exist_ok=True)
    cand = side / path.name
    _save(slim, cand, big)
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
        e = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        log.warning("graph %s: simplified graph rejected (%s); keeping the unsimplified graph", spec.name, e)
        shutil.rmtree(side)
        return f"rejected: {e}"
    for f in side.iterdir():
        os.replace(f, path.parent / f.name)
    side.rmdir()
    return True


def _release_memory() -> None:
    """gc, then hand freed heap back to the OS (glibc keeps it otherwise, and RSS would not drop)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Samples this process's RSS in a thread: peak during a `with` block (MB)."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.peak = self.start = self.proc.memory_info().rss
        self.start_mb = round(self.start / 2**20, 1)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.peak_mb = round(self.peak / 2**20, 1)


# -- all graphs, atomically ------------------------------------------------------------------------
def is_export_dir(d: Path) -> bool:
    """An earlier export of ours: a manifest of ours, and nothing in d it does not account for."""
    from .manifest import listed_files

    try:
        m = json.loads((d / "manifest.json").read_text())
        listed = listed_files(m)
        assert "janusflow_trt_version" in m and "format_version" in m
    except (OSError, ValueError, KeyError, TypeError, AttributeError, AssertionError):
        return False
    return {p.name for p in d.iterdir()} <= listed


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise JanusFlowError(f"--opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET} "
                             f"(the dynamo exporter writes opset {MIN_OPSET} and newer)")


def export_graphs(model_dir: str | Path, vae_dir: str | Path | None, out_dir: str | Path,
                  graphs: str | list[str] | None = None, opset: int = 18, progress: bool = True,
                  force_legacy: tuple[str, ...] = (), force: bool = False,
                  precisions: str | list[str] | None = None, calib_inputs=None, vae_precision: str = "fp16",
                  calib_plan=None, calib_method: str | None = None) -> dict[str, Any]:
    """Export `graphs` (default all) to out_dir; -> the manifest. force_legacy: graphs that skip dynamo.
    An existing out_dir is replaced only if it is an earlier export and force is set.
    precisions: fp32 always, fp16 derived from it (export/variants.py) on calib_inputs (default: built-in)."""
    from tqdm import tqdm

    from .variants import parse_precisions

    names = parse_graphs(graphs)
    precs = parse_precisions(precisions)
    if any(p.startswith("int8") for p in precs) and calib_inputs is not None:
        from janusflow_trt.calibration.int8_calib import check_inputs

        check_inputs(calib_inputs)
    check_opset(opset)
    model_dir = Path(model_dir)
    cfg: JanusFlowConfig = load_config(model_dir)
    vae = resolve_vae(model_dir, vae_dir, "vae_dec" in names)
    protected = [("model", model_dir)] + ([("VAE", vae)] if vae is not None else [])
    out = check_out_dir(out_dir, "--out", force, is_export_dir, "an earlier export (manifest.json)", protected)
    tmp = make_tmp(out, "--out")
    try:
        cfg, mods = load_modules(model_dir, vae, names)
        specs = build_specs(cfg)
        entries: dict[str, dict] = {}
        # phase 1 needs the torch model; phase 2 (checks, ORT, simplification) runs after it is freed:
        # at full size the fp32 model (~8 GB) plus the LLM graph loaded 2-3 times does not fit in 24 GB
        bar = tqdm(names, desc="export", unit="graph", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            with PeakRSS() as rss:
                entries[name] = _export_one(name, mods[name], specs[name], tmp, opset, name in force_legacy)
            entries[name].update(export_seconds=round(time.perf_counter() - t0, 2), export_peak_rss_mb=rss.peak_mb,
                                 export_start_rss_mb=rss.start_mb)
        del mods
        _release_memory()
        bar = tqdm(names, desc="check", unit="graph", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            with PeakRSS() as rss:
                info = _finish_one(name, specs[name], tmp, opset)
            e = entries[name]
            e.update(info, check_seconds=round(time.perf_counter() - t0, 2), check_peak_rss_mb=rss.peak_mb,
                     check_start_rss_mb=rss.start_mb)
            _release_memory()
            e.update(seconds=round(e["export_seconds"] + e["check_seconds"], 2),
                     peak_rss_mb=max(e["export_peak_rss_mb"], e["check_peak_rss_mb"]))
            data = e.pop("data")
            entries[name] = graph_entry(specs[name], f"{name}.onnx", data, tmp, e.pop("opset"), e)
        manifest = build_manifest(cfg, entries)
        if "fp16" in precs:
            from janusflow_trt.calibration.data import calibration_set

            from .variants import add_fp16

            inputs = calib_inputs if calib_inputs is not None else calibration_set()
            manifest["calibration"] = add_fp16(model_dir, vae, tmp, out, specs, entries, inputs, vae_precision,
                                               progress, calib_plan)
        int8 = [p for p in precs if p.startswith("int8")]
        if int8:
            from janusflow_trt.calibration.data import calibration_set

            from .int8 import add_int8

            inputs = calib_inputs if calib_inputs is not None else calibration_set()
            manifest["calibration"] = add_int8(model_dir, vae, tmp, out, specs, entries, inputs, int8,
                                               calib_method, progress, calib_plan)
        from .views import add_views

        add_views(tmp, entries, specs)  # after the precision variants: one view per variant file
        write_manifest(tmp, manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
