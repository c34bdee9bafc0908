"""Does the quality gate's exclusion search cost int8-cpu its CPU speed (issue 24: decode >= 2x, Euler step
>= 2.5x FP32 at the golden widths), or was a slow reading the machine's noise?

Per initialisation (make-tiny --size golden --init default|peaked, seed 0), in WORK/<size>-<init>/:
1. `janusflow export --precision fp32,int8-cpu --gate G --calib-plan lean --accept-quality-miss` -> gate/
   (the gate's graphs: whatever its search kept float; --accept-quality-miss so that a variant the gate
   would refuse is still there to time, flagged; its verdict is recorded);
2. noexcl/: a copy whose int8-cpu graphs with gate exclusions are re-derived without them (the same
   calibration set, export/variants.py: derive_int8_entry); when the gate excluded nothing the two would
   be the same files, and the gate's int8-cpu is benched a second time instead (the run's own noise);
3. one process, the bench's own measurement (benchmarks/bench.py: measure, the pipeline users run):
   fp32 ORT, int8-cpu (gate), int8-cpu (no exclusions), every init, back to back after the machine's
   floors; ratios are FP32 time / variant time of the same init in this run.
Existing WORK directories are reused (delete them to export again; the gate recorded is the manifest's).
Writes one JSON (default docs/results/int8_golden_bench.json) and prints the ratios.

  PYTHONPATH=. python tools/experiments/int8_speed.py [--work /tmp/int8_speed] [--size golden] [--gate quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from janusflow_trt import Pipeline
from janusflow_trt.benchmarks.bench import Runtime, machine_info, measure, measure_floors
from janusflow_trt.calibration.record import PLANS, CalibrationData
from janusflow_trt.export.manifest import write_manifest
from janusflow_trt.export.specs import build_specs
from janusflow_trt.export.variants import derive_int8_entry
from janusflow_trt.export.views import add_views
from janusflow_trt.files import write_all
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.janusflow_ref.processor import Processor
from janusflow_trt.tiny import make_tiny

P = "int8-cpu"
GATE_REASON = "quality gate:"  # how the gate's search words an exclusion (janusflow_trt/quality_gate.py: _search)


def export(ckpt: Path, out: Path, gate: str) -> dict:
    cmd = [sys.executable, "-m", "janusflow_trt.cli", "export", "--model", str(ckpt), "--out", str(out),
           "--precision", f"fp32,{P}", "--gate", gate, "--calib-plan", "lean", "--accept-quality-miss"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"export failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return {"command": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t0, 1)}


def gate_exclusions(m: dict) -> dict[str, dict[str, str]]:
    """graph -> the nodes the gate's search kept float in its int8-cpu variant."""
    out = {}
    for g, e in m["graphs"].items():
        ex = e.get("precisions", {}).get(P, {}).get("recipe", {}).get("excluded", {})
        if any(v.startswith(GATE_REASON) for v in ex.values()):
            out[g] = {k: v for k, v in ex.items() if v.startswith(GATE_REASON)}
    return out


def without_exclusions(ckpt: Path, gate_dir: Path, out: Path) -> None:
    """gate_dir copied to out, its int8-cpu graphs re-derived with no gate exclusion (the int8-cpu plan's
    own float Convs / attention BMMs stay: derive_int8 adds them)."""
    shutil.copytree(gate_dir, out)
    m = json.loads((out / "manifest.json").read_text())
    cfg = load_config(ckpt)
    specs = build_specs(cfg)
    calib = CalibrationData(out / m["calibration"]["dir"])
    plan = PLANS["lean"]
    for g in gate_exclusions(m):
        derive_int8_entry(out, specs, m["graphs"], calib, g, P, None, plan, exclude={}, progress=True)
    add_views(out, m["graphs"], specs)
    m["quality_gate"]["precisions"][P]["note"] = "int8_speed.py: re-derived without the gate's exclusions"
    write_manifest(out, m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/int8_speed")
    ap.add_argument("--size", default="golden", choices=("golden", "small", "tiny"))
    ap.add_argument("--inits", default="default,peaked")
    ap.add_argument("--gate", default="quick", choices=("quick", "default"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--contexts", default="64,1024")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/int8_golden_bench.json")
    a = ap.parse_args()
    work = Path(a.work)
    contexts = [int(c) for c in a.contexts.split(",")]
    runs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for init in a.inits.split(","):
        d = work / f"{a.size}-{init}"
        ckpt, gate_dir, noexcl = d / "ckpt", d / "gate", d / "noexcl"
        if not ckpt.exists():
            make_tiny(ckpt, size=a.size, init=init, seed=0)
        info: dict[str, Any] = {"export": export(ckpt, gate_dir, a.gate) if not gate_dir.exists() else "reused"}
        m = json.loads((gate_dir / "manifest.json").read_text())
        rec = m["quality_gate"]["precisions"][P]
        info["gate"] = {"name": m["quality_gate"]["gate"]["name"], "met": rec["met"], "miss": rec.get("miss"),
                        "exclusions": [
            {k: e.get(k) for k in ("graph", "node", "weight_bytes", "cosine_alone", "graph_ms_before",
                                   "graph_ms_after", "graph_time_ratio")} for e in rec.get("exclusions", [])]}
        ex = gate_exclusions(m)
        if ex and not noexcl.exists():
            without_exclusions(ckpt, gate_dir, noexcl)
        # no exclusion: the gate's graphs are the recipe's; they run twice, the spread between the two
        # columns being this run's own noise
        info["variants"] = {"fp32": (gate_dir, "fp32"), f"{P}-gate": (gate_dir, P),
                            **({f"{P}-noexcl": (noexcl, P)} if ex else {f"{P}-gate-again": (gate_dir, P)})}
        runs[init] = (ckpt, info)

    torch.set_num_threads(a.threads)
    result: dict = {"question": "int8-cpu speed: the gate's graphs vs the same recipe without the gate's "
                                "exclusions, FP32 ORT the baseline, one process",
                    "size": a.size, "machine": machine_info(a.threads), "contexts": contexts,
                    "repeat": a.repeat, "e2e_steps": a.steps, "inits": {}}
    measure_floors(result)  # also brings the machine to a steady state before the first variant
    image = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    for init, (ckpt, info) in runs.items():
        cfg, processor = load_config(ckpt), Processor(ckpt)
        times = {}
        for name, (art, p) in info.pop("variants").items():
            print(f"{init} {name} ...", flush=True)
            runner = Runtime(Pipeline.from_pretrained(ckpt, "ort", art, precision=p, threads=a.threads), p)
            times[name] = measure(runner, cfg, processor, image, contexts, a.repeat, 16, a.steps, print)
        base = times["fp32"]
        key = lambda r: {**{f"decode@{c}": r["decode_ms"][str(c)] for c in contexts},  # noqa: E731
                         "chat_decode": r["chat_decode_ms"], "euler_step": r["euler_ms"]["step"],
                         "prefill": r["prefill_ms"], "siglip": r["siglip_ms"]}
        info["ms"] = {n: key(r) for n, r in times.items()}
        info["speedup_vs_fp32"] = {n: {k: round(key(base)[k] / v, 3) for k, v in key(r).items()}
                                   for n, r in times.items() if n != "fp32"}
        info["raw"] = times
        result["inits"][init] = info
    write_all([(Path(a.out), lambda t: Path(t).write_text(json.dumps(result, indent=2, default=str)))])
    print(f"\nwrote {a.out}; FP32 / int8-cpu time (targets: decode >= 2x, Euler step >= 2.5x); "
          f"floors {'NOISY' if result['floors']['noisy'] else 'steady'}")
    for init, info in result["inits"].items():
        excl = ", ".join(f"{e['graph']}:{e['node']}" for e in info["gate"]["exclusions"]) or "none"
        print(f"{a.size} {init}: {info['gate']['name']} gate {'met' if info['gate']['met'] else 'MISSED'}, "
              f"kept float: {excl}")
        for n, s in info["speedup_vs_fp32"].items():
            print(f"  {n:16s} " + "  ".join(f"{k} {v:.2f}x" for k, v in s.items()))


if __name__ == "__main__":
    main()
