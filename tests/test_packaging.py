"""The distribution installs one import namespace, janusflow_trt, holding every module of the
repository's top-level folders (the wheel is built here and read, not assumed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("janusflow_ref", "export", "runtime", "calibration", "benchmarks")


def test_wheel_has_one_top_level_namespace_with_every_module(tmp_path):
    # built from a copy: setuptools' build/ cache in the tree would hide a package missing from pyproject
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "*_out", ".*_cache", "tests"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("janusflow_trt-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert {n.split("/")[0] for n in names} == {"janusflow_trt", whl.name.split("-py3")[0] + ".dist-info"}
    for folder in FOLDERS:
        for f in (ROOT / folder).rglob("*.py"):
            assert f"janusflow_trt/{f.relative_to(ROOT).as_posix()}" in names, f
    assert "janusflow_trt/export/data/onnx_tensorrt_operators.md" in names
    entry = zipfile.ZipFile(whl).read(whl.name.split("-py3")[0] + ".dist-info/entry_points.txt").decode()
    assert "janusflow = janusflow_trt.cli:main" in entry
