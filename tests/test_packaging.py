"""The distribution installs one import namespace, janusflow_trt, holding every module of the
repository's top-level folders and nothing else: no tests, no tools, no research scripts (the wheel is
built here and read, not assumed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("janusflow_ref", "export", "runtime", "calibration", "benchmarks")
# research scripts that lived in benchmarks/ (now tools/experiments/): run from a checkout, never installed
RESEARCH = ("profile_step.py", "profile_decode.py", "attention_kernels.py", "int8_chat_split.py",
            "measure_llm_split.py")


def build_wheel(tmp_path: Path) -> Path:
    # built from a copy: setuptools' build/ cache in the tree would hide a package missing from pyproject
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "*_out", ".*_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = tmp_path.glob("janusflow_trt-*.whl")
    return whl


def test_wheel_holds_janusflow_trt_only_with_every_module(tmp_path):
    whl = build_wheel(tmp_path)
    dist_info = whl.name.split("-py3")[0] + ".dist-info"
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        entry = z.read(f"{dist_info}/entry_points.txt").decode()
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    stray = [n for n in names if not n.startswith(("janusflow_trt/", f"{dist_info}/"))]
    assert not stray, f"outside janusflow_trt/: {stray}"
    assert not [n for n in names if Path(n).name in RESEARCH], "research scripts in the wheel"
    tools = {f.name for f in (ROOT / "tools").rglob("*.py") if f.name != "__init__.py"}
    assert not [n for n in names if Path(n).name in tools], "files of tools/ in the wheel"
    # a script that puts its checkout on sys.path runs from the repository, not from an install
    assert not [n for n, text in sources.items() if "sys.path.insert" in text], "checkout-only scripts"
    for folder in FOLDERS:
        for f in (ROOT / folder).rglob("*.py"):
            assert f"janusflow_trt/{f.relative_to(ROOT).as_posix()}" in names, f
    assert "janusflow_trt/export/data/onnx_tensorrt_operators.md" in names
    assert "janusflow = janusflow_trt.cli:main" in entry
