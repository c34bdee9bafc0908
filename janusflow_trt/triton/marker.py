"""REPO/janusflow_triton.json: what a repository was written from; it marks the directory as ours (--force,
`triton-server`). Standard library only: the server's launcher reads it before it execs tritonserver."""

from __future__ import annotations

import json
from pathlib import Path

from janusflow_trt.errors import InputError

MARKER = "janusflow_triton.json"


def is_repo(d: Path) -> bool:
    """A repository this command wrote (its marker names our version)."""
    try:
        return "janusflow_trt_version" in json.loads((d / MARKER).read_text())
    except (OSError, ValueError, TypeError):
        return False


def repo_variant(d: Path) -> str:
    """The variant of a repository this command wrote; refuses anything else in one line."""
    if not is_repo(d):
        raise InputError(f"{d} is not a Triton repository written by janusflow triton-repo")
    return str(json.loads((d / MARKER).read_text()).get("backend"))
