"""`janusflow export` end to end: FP32 graphs -> calibration recording (the runtime's own loops over
those FP32 graphs, through janusflow_trt/recording.py) -> FP16 / INT8 variants -> views -> manifest, all
written into a temporary directory that replaces OUT atomically (files.dir_transaction). It runs the
runtime, so it sits above it; export/ holds the steps and imports no runtime."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from janusflow_trt.calibration.data import InputSet, calibration_set
from janusflow_trt.calibration.int8_calib import check_inputs
from janusflow_trt.calibration.record import PLANS, CalibrationData, Plan, recording_key
from janusflow_trt.export.manifest import build_manifest, is_export_dir, write_manifest
from janusflow_trt.export.memory import PeakRSS, max_rss_mb, release_freed_promptly, release_memory
from janusflow_trt.export.torch_to_onnx import check_opset, export_fp32, parse_graphs, resolve_vae
from janusflow_trt.export.variants import (
    CALIB_DIR,
    add_fp16,
    add_int8,
    calibration_entry,
    check_options,
    parse_precisions,
)
from janusflow_trt.export.views import add_views
from janusflow_trt.files import check_out_dir, dir_transaction
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.quality_gate import Gate, check_graphs, choose_gate, run_gate, split
from janusflow_trt.recording import check_prompts, record, recorder_backend


def calibration_data(model_dir: Path, vae_dir: Path | None, tmp: Path, old_out: Path, inputs: InputSet,
                     plan: Plan, graphs: list[str], progress: bool) -> tuple[CalibrationData, bool]:
    """The set in tmp/calib: copied from the previous OUT when its key (checkpoint, inputs, plan, backend)
    matches, else recorded, through the FP32 graphs of `graphs` just written to tmp where they hold every
    graph the recording runs (recording.recorder_backend). -> (the set, reused?)."""
    key = recording_key(model_dir, vae_dir, inputs, plan, recorder_backend(graphs))
    old = old_out / CALIB_DIR
    try:
        reusable = json.loads((old / "index.json").read_text()).get("key") == key
    except (OSError, json.JSONDecodeError):
        reusable = False
    if reusable:
        shutil.copytree(old, tmp / CALIB_DIR)
    else:
        record(model_dir, vae_dir, tmp / CALIB_DIR, inputs, plan, progress=progress, artifacts=tmp, graphs=graphs)
    return CalibrationData(tmp / CALIB_DIR), reusable


@contextlib.contextmanager
def _phase(phases: dict[str, dict[str, float]], name: str, progress: bool) -> Iterator[None]:
    """One phase of the run: freed heap handed back first, then its seconds and peak RSS into phases[name]
    (manifest['run']['phases']), a line when progress."""
    release_memory()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        yield
    phases[name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": rss.peak_mb}
    if progress:
        tqdm.write(f"phase {name}: {phases[name]['seconds']:.1f} s, peak RSS {rss.peak_mb:.0f} MB")


def export_graphs(model_dir: str | Path, vae_dir: str | Path | None, out_dir: str | Path,
                  graphs: str | list[str] | None = None, opset: int = 18, progress: bool = True,
                  force_legacy: tuple[str, ...] = (), force: bool = False,
                  precisions: str | list[str] | None = None, calib_inputs: InputSet | None = None,
                  vae_precision: str = "fp16", calib_plan: Plan | None = None,
                  calib_method: str | None = None, gate: Gate | str | None = None,
                  accept_quality_miss: bool = False) -> dict[str, Any]:
    """Export `graphs` (default all) to out_dir; -> the manifest. force_legacy: graphs that skip dynamo.
    An existing out_dir is replaced only if it is an earlier export and force is set. precisions: fp32
    always; fp16 / int8 / int8-cpu derived from it on one calibration set recorded from calib_inputs
    (default: the built-in set) with calib_plan (default: PLANS['default']). gate: the quality gate
    (janusflow_trt/quality_gate.py; the CLI always runs one) holds its inputs out of the calibration set and
    measures every variant; a missing one is dropped unless accept_quality_miss; None: no gate; a name
    (`--gate`: auto or a preset of quality_gate.GATES) is resolved by quality_gate.choose_gate (auto: by
    the checkpoint's LLM size), the choice recorded in the manifest."""
    t_run = time.perf_counter()
    release_freed_promptly()
    names = parse_graphs(graphs)
    precs = parse_precisions(precisions)
    int8 = [p for p in precs if p.startswith("int8")]
    if int8 and calib_inputs is not None:
        check_inputs(calib_inputs)
    check_options(precs, vae_precision, calib_method)
    check_opset(opset)
    model_dir = Path(model_dir)
    cfg0 = load_config(model_dir)  # a missing or bad config fails before OUT is touched
    gate, choice = choose_gate(gate, cfg0) if isinstance(gate, str) else (gate, "given")
    inputs = None
    if precs != ["fp32"]:
        inputs = calib_inputs if calib_inputs is not None else calibration_set()
        check_prompts(model_dir, inputs)  # a prompt beyond the context: refused now, not after the FP32 export
        if gate is not None:
            check_graphs(names, precs, accept_quality_miss)
            inputs, held = split(inputs, gate)  # the recording never sees the gate's inputs
    vae = resolve_vae(model_dir, vae_dir, "vae_dec" in names)
    protected = [("model", model_dir)] + ([("VAE", vae)] if vae is not None else [])
    out = check_out_dir(out_dir, "--out", force, is_export_dir, "an earlier export (manifest.json)", protected)
    phases: dict[str, dict[str, float]] = {}
    phase = lambda name: _phase(phases, name, progress)  # noqa: E731
    with dir_transaction(out, "--out") as tmp:
        with phase("fp32"):
            cfg, specs, entries = export_fp32(model_dir, vae, tmp, names, opset, force_legacy, progress)
        manifest = build_manifest(cfg, entries)
        if inputs is not None:
            write_manifest(tmp, manifest)  # the FP32 export as a runtime reads it: the recording runs on it
            plan = calib_plan or PLANS["default"]
            t0 = time.perf_counter()
            with phase("calibration"):
                calib, reused = calibration_data(model_dir, vae, tmp, out, inputs, plan, list(entries), progress)
            record_s = time.perf_counter() - t0
            if progress:
                tqdm.write(f"calibration set: {'reused' if reused else 'recorded'} in {record_s:.1f} s")
            if "fp16" in precs:
                with phase("fp16"):
                    add_fp16(tmp, specs, entries, calib, vae_precision, plan, progress, smoothing=bool(int8))
            if int8:  # after fp16: the TensorRT flavour takes the FP16 variant's islands
                with phase(",".join(int8)):
                    add_int8(tmp, specs, entries, calib, int8, calib_method, plan, progress)
            manifest["calibration"] = calibration_entry(calib, reused, record_s, entries)
        with phase("views"):
            add_views(tmp, entries, specs)  # after the precision variants: one view per variant file
        if inputs is not None and gate is not None:
            with phase(f"gate ({gate.name})"):
                run_gate(tmp, model_dir, cfg, specs, entries, manifest, calib, held, gate, precs, calib_method,
                         plan, accept_quality_miss, progress, choice)
        manifest["run"] = {"seconds": round(time.perf_counter() - t_run, 1), **max_rss_mb(), "phases": phases}
        write_manifest(tmp, manifest)
    return manifest
