"""`janusflow gpu-check`: on an NVIDIA machine, run the checks CI cannot (the `-m gpu` tests:
engine build, engines vs ONNX Runtime FP32 per graph with the spec tolerances, CUDA-graph replay
equal to eager) and write pytest's JUnit report. Tests whose library is missing (TensorRT) skip with
the reason, which the summary lists.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from janusflow_ref.errors import JanusFlowError

TESTS = Path(__file__).resolve().parent.parent / "tests" / "test_gpu.py"


def cmd_gpu_check(args) -> int:
    from export.trt_build import require_cuda

    require_cuda("janusflow gpu-check")
    if not TESTS.is_file():
        raise JanusFlowError(f"{TESTS} not found: gpu-check runs from a source checkout")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-v", str(TESTS), f"--junitxml={out / 'gpu.xml'}"]
    return subprocess.run(cmd, check=False).returncode


def register(subparsers) -> None:
    p = subparsers.add_parser("gpu-check", help="run the GPU tests (needs an NVIDIA GPU; TensorRT optional)")
    p.add_argument("--out", default="gpu_check", help="report directory (JUnit XML)")
    p.set_defaults(func=cmd_gpu_check)
