"""Write a patched copy of the installed tensorrt-stubs into DIR, for `MYPYPATH=DIR mypy`.

tensorrt-stubs (pinned in pyproject/Makefile) ships tensorrt/*.pyi and tensorrt_bindings/*.pyi with no
py.typed marker (mypy would treat tensorrt as Any) and with lines that are not valid Python: parameters
named `in` (a keyword) and a required parameter after defaulted ones. Each patch below fixes one such
defect; the script fails if a patch no longer applies, so a stubs upgrade is looked at, not ignored.
Usage: python .ci/trt_stubs_overlay.py DIR
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

PATCHES = [  # (file, pattern, replacement, expected number of matches)
    ("tensorrt_bindings/tensorrt.pyi", r"\(self(: IPluginV3)?, in: ", r"(self\1, in_: ", 4),
    ("tensorrt_bindings/tensorrt.pyi", r"power: Weights = None, channel_axis: int\)",
     "power: Weights = None, channel_axis: int = ...)", 1),
]


def main(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for pkg in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            sys.exit(f"{pkg} stubs not installed (pip install --no-deps tensorrt-stubs)")
        src = Path(next(iter(spec.submodule_search_locations)))
        shutil.rmtree(dest / pkg, ignore_errors=True)
        shutil.copytree(src, dest / pkg, ignore=shutil.ignore_patterns("*.py", "__pycache__", "*.so"))
    for file, pat, rep, n in PATCHES:
        p = dest / file
        text, count = re.subn(pat, rep, p.read_text())
        if count != n:
            sys.exit(f"stub patch {pat!r} matched {count} times in {file}, expected {n}: review the patches")
        p.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    main(Path(sys.argv[1]))
