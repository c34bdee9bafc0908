"""`janusflow gpu-check`: on an NVIDIA machine, run the checks CI cannot (the `-m gpu` tests: engine
build, engines vs ONNX Runtime FP32 per graph with the spec tolerances, CUDA-graph replay equal to eager,
the device Euler loop) and write pytest's JUnit report plus a JSON and markdown summary of it. Tests
whose library is missing (TensorRT) skip with the reason, which the summary lists.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from janusflow_trt.errors import JanusFlowError

TESTS = Path(__file__).resolve().parent.parent / "tests" / "test_gpu.py"


def cmd_gpu_check(args) -> int:
    from janusflow_trt.export.trt_build import require_cuda

    require_cuda("janusflow gpu-check")
    if not TESTS.is_file():
        raise JanusFlowError(f"{TESTS} not found: gpu-check runs from a source checkout")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-v", str(TESTS), f"--junitxml={out / 'gpu.xml'}"]
    rc = subprocess.run(cmd, check=False).returncode
    if (out / "gpu.xml").is_file():
        write_report(summarise_junit(out / "gpu.xml"), out)
    return rc


def summarise_junit(path: Path) -> list[dict[str, str]]:
    """One row per test: name, outcome (passed|failed|error|skipped), and the message where there is one."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (el.get("message") or "").splitlines()[0][:200] if el.get("message") else ""
                break
        rows.append({"test": case.get("name", "?"), "outcome": outcome, "message": message})
    return rows


def write_report(rows: list[dict[str, str]], out: Path) -> None:
    (out / "gpu.json").write_text(json.dumps(rows, indent=2))
    lines = ["| test | outcome | message |", "|---|---|---|"]
    lines += [f"| {r['test']} | {r['outcome']} | {r['message'].replace('|', '/')} |" for r in rows]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def register(subparsers) -> None:
    p = subparsers.add_parser("gpu-check", help="run the GPU tests (needs an NVIDIA GPU; TensorRT optional)")
    p.add_argument("--out", default="gpu_check", help="report directory (JUnit XML)")
    p.set_defaults(func=cmd_gpu_check)
