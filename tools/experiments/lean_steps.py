"""Does recording the lean plan's one full text-to-image run over fewer Euler steps change what the export
measures? (issue 26: the recording at full size is ~40 FP32 Euler steps, most of them that one run.)
For each checkpoint: `export_graphs(--precision fp32,fp16,int8-cpu --gate quick)` with the lean plan as
it was (30 steps) and with `steps` = 10 (the same timesteps 0 .. 0.9 on a coarser grid; every other field
the same), then the quality gate's figures of each variant (its own held-out inputs, its own FP32
reference) and the FP16 variant's FP32 islands side by side. Writes docs/results/lean_steps_small.json.

    PYTHONPATH=. python tools/experiments/lean_steps.py CKPT_DEFAULT CKPT_PEAKED [--work /tmp/lean_steps]
    (make-tiny --size small, --init default / peaked; ~3 min per export on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from janusflow_trt.calibration.record import PLANS
from janusflow_trt.export_job import export_graphs

STEPS = (30, 10)


def one(ckpt: str, out: Path, steps: int) -> dict:
    plan = replace(PLANS["lean"], steps=steps, name=f"lean, {steps} steps")
    t0 = time.perf_counter()
    m = export_graphs(ckpt, None, out, progress=False, precisions="fp32,fp16,int8-cpu", calib_plan=plan,
                      gate="quick", accept_quality_miss=True, force=True)
    g = m["quality_gate"]["precisions"]
    return {"plan_steps": steps, "calibration_s": m["run"]["phases"]["calibration"]["seconds"],
            "export_s": round(time.perf_counter() - t0, 1),
            "fp16_llm_islands": len(m["graphs"]["llm"]["precisions"]["fp16"]["recipe"].get("kept_fp32", {})),
            **{p: {"met": r["met"], **{c["target"]: round(c["value"], 6) for c in r["figures"]["checks"]}}
               for p, r in g.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--work", default="/tmp/lean_steps")
    ap.add_argument("--out", default="docs/results/lean_steps_small.json")
    a = ap.parse_args()
    res = {"command": "python tools/experiments/lean_steps.py " + " ".join(a.ckpts), "runs": {}}
    for ck in a.ckpts:
        res["runs"][ck] = [one(ck, Path(a.work) / f"{Path(ck).name}-{s}", s) for s in STEPS]
        print(json.dumps(res["runs"][ck], indent=1), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
