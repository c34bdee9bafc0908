"""Precision variants written beside the FP32 graphs during `janusflow export --precision ...`.

Graph by graph: each FP16 graph is derived from its FP32 file on disk (loaded, converted, saved,
freed) so at most one precision of one graph is in memory. The calibration set is recorded into
OUT/calib on the FP32 torch-fast runtime, or reused from the previous OUT when its key matches.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from janusflow_trt.calibration.data import InputSet
from janusflow_trt.calibration.record import PLANS, CalibrationData, Plan, recording_key
from janusflow_trt.recording import record
from janusflow_trt.errors import JanusFlowError

from .manifest import precision_entry
from .specs import PRECISIONS, GraphSpec

VAE_PRECISIONS = ("fp16", "fp32")
CALIB_DIR = "calib"


def parse_precisions(s: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if s is None:
        return ["fp32"]
    names = [p.strip() for p in (s.split(",") if isinstance(s, str) else s) if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if bad or not names:
        raise JanusFlowError(f"unknown precision {bad[0] if bad else '(none)'!r}; choose from {','.join(PRECISIONS)}")
    return [p for p in PRECISIONS if p in names or p == "fp32"]  # fp16 is derived from fp32: always both


def calibration_data(model_dir: Path, vae_dir: Path | None, tmp: Path, old_out: Path, inputs: InputSet,
                     plan: Plan, progress: bool) -> tuple[CalibrationData, bool]:
    """-> (the set in tmp/calib, reused?)."""
    key = recording_key(model_dir, vae_dir, inputs, plan)
    old = old_out / CALIB_DIR
    try:
        reusable = json.loads((old / "index.json").read_text()).get("key") == key
    except (OSError, json.JSONDecodeError):
        reusable = False
    if reusable:
        shutil.copytree(old, tmp / CALIB_DIR)
    else:
        record(model_dir, vae_dir, tmp / CALIB_DIR, inputs, plan, progress=progress)
    return CalibrationData(tmp / CALIB_DIR), reusable


def add_fp16(model_dir: Path, vae_dir: Path | None, tmp: Path, old_out: Path, specs: dict[str, GraphSpec],
             entries: dict[str, dict[str, Any]], inputs: InputSet, vae_precision: str = "fp16",
             progress: bool = True, plan: Plan | None = None) -> dict[str, Any]:
    """Write tmp/<graph>.fp16.onnx for every exported graph; fill entries[g]['precisions']['fp16'];
    -> the manifest's 'calibration' record."""
    from tqdm import tqdm

    from .fp16 import derive_fp16
    from .onnx_export import EXTERNAL_DATA_BYTES, PeakRSS, _release_memory

    if vae_precision not in VAE_PRECISIONS:
        raise JanusFlowError(f"--vae-precision must be one of {','.join(VAE_PRECISIONS)}, got {vae_precision!r}")
    t0 = time.perf_counter()
    plan = plan or PLANS["default"]
    calib, reused = calibration_data(model_dir, vae_dir, tmp, old_out, inputs, plan, progress)
    record_s = time.perf_counter() - t0
    if progress:
        tqdm.write(f"calibration set: {'reused' if reused else 'recorded'} in {record_s:.1f} s")
    bar = tqdm(entries.items(), desc="fp16", unit="graph", disable=not progress)
    for name, e in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        src = e["file"]
        if name == "vae_dec" and vae_precision == "fp32":
            v = precision_entry(tmp, src, (e.get("external_data") or {}).get("file"),
                                {"kept_fp32": "all nodes and I/O (--vae-precision fp32)"}, src)
        else:
            with PeakRSS() as rss:
                big = (tmp / src).stat().st_size > EXTERNAL_DATA_BYTES or bool(e.get("external_data"))
                out = f"{name}.fp16.onnx"
                r = derive_fp16(tmp / src, specs[name], calib, tmp / out, big, limit=plan.measure_samples,
                                check=plan.check_samples)
            v = precision_entry(tmp, out, r["data"], r["recipe"], src)
            v.update(seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=rss.peak_mb)
            _release_memory()
            if progress:
                rc = r["recipe"]
                bar.write(f"fp16 {name}: {v['seconds']:.1f} s, peak RSS {rss.peak_mb:.0f} MB, "
                          f"{rc['calibration_samples']} samples x {rc['measure_runs_per_sample']} runs")
        e.setdefault("precisions", {})["fp16"] = v
    return {"dir": CALIB_DIR, "sha256": calib.sha256, "key": calib.index["key"], "reused": reused,
            "record_seconds": round(record_s, 2), "bytes": calib.index["bytes"],
            "samples": {g: calib.count(g) for g in entries}, "inputs_sha256": calib.index["inputs_sha256"],
            "plan": calib.index["plan"]}
