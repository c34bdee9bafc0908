"""Precision variants written beside the FP32 graphs of an export directory, derived from a recorded
calibration set (calibration/record.py: CalibrationData; janusflow_trt/export_job.py records or reuses it).

Graph by graph: each variant is derived from its FP32 file on disk (loaded, converted, saved, freed), so
at most one precision of one graph is in memory.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from janusflow_trt.calibration.int8_calib import METHODS
from janusflow_trt.calibration.record import PLANS, CalibrationData, Plan
from janusflow_trt.errors import JanusFlowError

from .fp16 import derive_fp16
from .int8 import (
    NOT_QUANTIZED,
    derive_int8,
    fp16_islands,
    keep_smoothing_maxima,
    modelopt_python,
    passthrough_recipe,
    smoothed_activations,
)
from .manifest import precision_entry
from .memory import PeakRSS, release_memory
from .onnx_io import needs_external_data
from .specs import PRECISIONS, GraphSpec

VAE_PRECISIONS = ("fp16", "fp32")
CALIB_DIR = "calib"  # the recorded set's folder in an export directory


def parse_precisions(s: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if s is None:
        return ["fp32"]
    names = [p.strip() for p in (s.split(",") if isinstance(s, str) else s) if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if bad or not names:
        raise JanusFlowError(f"unknown precision {bad[0] if bad else '(none)'!r}; choose from {','.join(PRECISIONS)}")
    return [p for p in PRECISIONS if p in names or p == "fp32"]  # fp16 is derived from fp32: always both


def check_options(precisions: list[str], vae_precision: str, method: str | None) -> None:
    """Refuse the variants' options before anything is exported or recorded."""
    if "fp16" in precisions and vae_precision not in VAE_PRECISIONS:
        raise JanusFlowError(f"--vae-precision must be one of {','.join(VAE_PRECISIONS)}, got {vae_precision!r}")
    if any(p.startswith("int8") for p in precisions) and method is not None and method not in METHODS:
        raise JanusFlowError(f"--calib-method must be one of {','.join(METHODS)}, got {method!r}")


def _big(out: Path, e: dict[str, Any]) -> bool:
    """The FP32 file needs external data, or has it: its variants are written with external data too."""
    return needs_external_data((out / e["file"]).stat().st_size) or bool(e.get("external_data"))


def add_fp16(out: Path, specs: dict[str, GraphSpec], entries: dict[str, dict[str, Any]], calib: CalibrationData,
             vae_precision: str = "fp16", plan: Plan | None = None, progress: bool = True,
             smoothing: bool = False) -> None:
    """Write out/<graph>.fp16.onnx for every exported graph; fill entries[g]['precisions']['fp16'].
    smoothing: an INT8 variant follows; the range walk of a graph SmoothQuant migrates also measures its
    channel maxima (the same samples), so the INT8 derivation does not walk the graph again for them."""
    plan = plan or PLANS["default"]
    bar = tqdm(entries.items(), desc="fp16", unit="graph", disable=not progress)
    for name, e in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        src = e["file"]
        if name == "vae_dec" and vae_precision == "fp32":
            v = precision_entry(out, src, (e.get("external_data") or {}).get("file"),
                                {"kept_fp32": "all nodes and I/O (--vae-precision fp32)"}, src)
        else:
            with PeakRSS() as rss:
                file = f"{name}.fp16.onnx"
                channels = smoothed_activations(out / src, specs[name]) if smoothing else []
                r = derive_fp16(out / src, specs[name], calib, out / file, _big(out, e), limit=plan.measure_samples,
                                check=plan.check_samples, channels=channels)
                if "channel_absmax" in r:
                    keep_smoothing_maxima(out / src, calib, plan.measure_samples, r["channel_absmax"])
            v = precision_entry(out, file, r["data"], r["recipe"], src)
            v.update(seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=rss.peak_mb)
            release_memory()
            if progress:
                rc = r["recipe"]
                bar.write(f"fp16 {name}: {v['seconds']:.1f} s, peak RSS {rss.peak_mb:.0f} MB, "
                          f"{rc['calibration_samples']} samples x {rc['measure_runs_per_sample']} runs")
        e.setdefault("precisions", {})["fp16"] = v


def add_int8(out: Path, specs: dict[str, GraphSpec], entries: dict[str, dict[str, Any]], calib: CalibrationData,
             precisions: list[str], method: str | None = None, plan: Plan | None = None,
             progress: bool = True) -> None:
    """Write out/<graph>.<precision>.onnx for each int8 precision; fill entries[g]['precisions']. An fp16
    variant already in `entries` lends the TensorRT flavour its measured FP32 islands."""
    for name in entries:
        for prec in precisions:
            derive_int8_entry(out, specs, entries, calib, name, prec, method, plan, progress=progress)


def derive_int8_entry(out: Path, specs: dict[str, GraphSpec], entries: dict[str, dict[str, Any]],
                      calib: CalibrationData, name: str, prec: str, method: str | None = None,
                      plan: Plan | None = None, exclude: dict[str, str] | None = None,
                      progress: bool = True) -> None:
    """One graph's int8 variant (re)written and entries[name]['precisions'][prec] set; exclude: node ->
    why it stays float (the quality gate's search, janusflow_trt/quality_gate.py)."""
    limit = (plan or PLANS["default"]).measure_samples  # per graph, samples calibrated on (None: all recorded)
    e = entries[name]
    t0 = time.perf_counter()
    src = e["file"]
    if name in NOT_QUANTIZED:
        v = precision_entry(out, src, (e.get("external_data") or {}).get("file"), passthrough_recipe(name), src)
    else:
        with PeakRSS() as rss:
            file = f"{name}.{prec}.onnx"
            isl = (fp16_islands(out / src, specs[name], calib, e.get("precisions", {}).get("fp16"), limit)
                   if prec == "int8" and modelopt_python() is None else None)
            r = derive_int8(out / src, specs[name], calib, out / file, prec, method, exclude=exclude,
                            big=_big(out, e), islands=isl, limit=limit)
        v = precision_entry(out, file, r["data"], r["recipe"], src)
        v["recipe"]["calibration_sha256"] = calib.sha256
        v.update(seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=rss.peak_mb)
        release_memory()
        if progress:
            print(f"{prec} {name}: {v['seconds']:.1f} s, peak RSS {rss.peak_mb:.0f} MB, "
                  f"{r['recipe']['calibration_samples']} samples", file=sys.stderr, flush=True)
    e.setdefault("precisions", {})[prec] = v


def calibration_entry(calib: CalibrationData, reused: bool, record_seconds: float, graphs) -> dict[str, Any]:
    """The manifest's 'calibration' record: the set the variants were derived from (one per export)."""
    return {"dir": calib.path.name, "sha256": calib.sha256, "key": calib.index["key"], "reused": reused,
            "record_seconds": round(record_seconds, 2), "bytes": calib.index["bytes"],
            "samples": {g: calib.count(g) for g in graphs}, "inputs_sha256": calib.index["inputs_sha256"],
            "plan": calib.index["plan"]}
