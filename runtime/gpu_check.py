"""`janusflow gpu-check`: on an NVIDIA machine, run the checks CI cannot (the `-m gpu` tests: engine
build, engines vs ONNX Runtime FP32 per graph with the spec tolerances, CUDA-graph replay equal to eager,
the device Euler loop) and write pytest's JUnit report plus a JSON and markdown summary of it. Tests
whose library is missing (TensorRT) skip with the reason, which the summary lists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from janusflow_trt.errors import JanusFlowError
from janusflow_trt.files import check_output_dir, owned_tempdir, write_into

TESTS = Path(__file__).resolve().parent.parent / "tests" / "test_gpu.py"
OUTPUTS = ("gpu.xml", "gpu.json", "gpu.md")


def pytest_command(junit: Path) -> list[str]:
    """The -m gpu run, writing nothing into the checkout: no cache provider (.pytest_cache), and the
    rootdir is the caller's work directory (the cwd); the checkout's pyproject.toml only for its markers."""
    ini = TESTS.parent.parent / "pyproject.toml"
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--rootdir={junit.parent}",
            *(["-c", str(ini)] if ini.is_file() else []), "-m", "gpu", "-rs", "-v", str(TESTS),
            f"--junitxml={junit}"]


def cmd_gpu_check(args) -> int:
    from janusflow_trt.export.trt_build import require_cuda

    out = check_output_dir(args.out, "--out", args.force, OUTPUTS)  # before the work (and the GPU check)
    require_cuda("janusflow gpu-check")
    if not TESTS.is_file():
        raise JanusFlowError(f"{TESTS} not found: gpu-check runs from a source checkout")
    with owned_tempdir("janusflow-gpu-check") as work:  # removed on every exit path
        junit = work / "gpu.xml"
        # PYTHONDONTWRITEBYTECODE: pytest's assertion rewriting would write tests/__pycache__
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        rc = subprocess.run(pytest_command(junit), cwd=work, env=env, check=False).returncode
        if junit.is_file():
            write_report(summarise_junit(junit), out, junit)
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


def write_report(rows: list[dict[str, str]], out: Path, junit: Path | None = None) -> None:
    """gpu.json, gpu.md (and a copy of pytest's JUnit XML as gpu.xml) into OUT as one unit (files.write_into)."""
    lines = ["| test | outcome | message |", "|---|---|---|"]
    lines += [f"| {r['test']} | {r['outcome']} | {r['message'].replace('|', '/')} |" for r in rows]
    items = [("gpu.json", lambda t: Path(t).write_text(json.dumps(rows, indent=2))),
             ("gpu.md", lambda t: Path(t).write_text("\n".join(lines) + "\n"))]
    if junit is not None:
        items.insert(0, ("gpu.xml", lambda t: shutil.copyfile(junit, t)))
    write_into(out, items)


def register(subparsers) -> None:
    p = subparsers.add_parser("gpu-check", help="run the GPU tests (needs an NVIDIA GPU; TensorRT optional)")
    p.add_argument("--out", default="gpu_check", help="report directory: gpu.xml (JUnit), gpu.json, gpu.md, "
                   "written together; existing ones are replaced only with --force")
    p.add_argument("--force", action="store_true", help="replace existing gpu.xml / gpu.json / gpu.md in --out")
    p.set_defaults(func=cmd_gpu_check)
