"""CI type check of the GPU modules against tensorrt-stubs (they never run here, so this is the check that
their TensorRT API use is right). The second test proves the stubs are live: were tensorrt resolved as
Any (no stubs, or no overlay), a wrong attribute would pass and so would everything else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def overlay(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("typings")
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "trt_stubs_overlay.py"), str(d)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return d


def _mypy(overlay: Path, cache: Path, *files: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MYPYPATH": str(overlay)}
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", str(cache), *files]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def test_gpu_modules_typecheck_against_tensorrt_stubs(overlay, tmp_path):
    r = _mypy(overlay, tmp_path / "cache")  # the file list lives in pyproject's [tool.mypy]
    assert r.returncode == 0, r.stdout + r.stderr


def test_stubs_are_live_not_any(overlay, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import tensorrt as trt\n\n"
                     "def f(c: trt.IBuilderConfig) -> None:\n"
                     "    c.builder_optimisation_level = 3\n")
    r = _mypy(overlay, tmp_path / "cache", str(probe))
    assert r.returncode == 1 and "has no attribute \"builder_optimisation_level\"" in r.stdout, r.stdout
