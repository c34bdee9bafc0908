"""ENGINES/engines.json: what each TensorRT engine was built from and for, and the runtime's refusals.

An engine is only valid for the TensorRT version and GPU (compute capability) that built it, for the
exact ONNX graph it was parsed from and for the shapes inside its profiles. The checks below are plain
Python over this manifest, so they are tested without TensorRT; the runtime feeds them the facts of the
machine it runs on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from janusflow_trt.errors import CheckpointError
from janusflow_trt.images import write_atomic

from .manifest import VERSION, lookup_entry, read_json_manifest, sha256_file
from .trt_plan import Profile

FORMAT_VERSION = 1
FILE = "engines.json"
PRECISIONS = ("fp32", "fp16", "int8")


class EngineMismatchError(CheckpointError):
    """An engine built for another TensorRT, GPU, source graph or profile range."""


@dataclass(frozen=True)
class Target:
    """The machine an engine is built on / run on."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"


def source_graph(export_manifest: dict[str, Any], graph: str, precision: str) -> dict[str, str]:
    """{"file", "sha256"} of `graph`'s ONNX file (or view's) at `precision` in an export manifest."""
    e = lookup_entry(export_manifest, graph, precision)
    return {"file": str(e["file"]), "sha256": str(e["sha256"])}


def engine_entry(file: str, out_dir: Path, source: dict[str, str], profiles: list[Profile],
                 device_memory_bytes: int, seconds: float) -> dict[str, Any]:
    return {"file": file, "sha256": sha256_file(out_dir / file), "source": source,
            "profiles": [p.to_json() for p in profiles], "device_memory_bytes": device_memory_bytes,
            "seconds": round(seconds, 2)}


def build_engine_manifest(target: Target, precision: str, config_sha256: str, artifacts: Path,
                          engines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "janusflow_trt_version": VERSION,
            "tensorrt_version": target.tensorrt_version, "gpu": {"name": target.gpu_name,
                                                                 "compute_capability": target.compute_capability},
            "precision": precision, "config_sha256": config_sha256, "source_artifacts": str(artifacts.resolve()),
            "engines": engines}


def write_json_atomic(path: Path, obj: Any) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(obj, indent=2))

    write_atomic(path, write)


def read_engine_manifest(engines_dir: Path) -> dict[str, Any]:
    path = engines_dir / FILE
    m = read_json_manifest(path, "engines", "janusflow build")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}")
    return m


def _covers(have: Profile, want: Profile) -> str | None:
    """None if every shape `want` admits lies inside `have`'s range; else the first input that does not."""
    for name, (lo, _, hi) in want.shapes.items():
        if name not in have.shapes:
            return name
        hlo, _, hhi = have.shapes[name]
        if len(hlo) != len(lo) or any(a > b for a, b in zip(hlo, lo, strict=True)) \
                or any(a < b for a, b in zip(hhi, hi, strict=True)):
            return name
    return None


def check_engine_manifest(m: dict[str, Any], here: Target, config_sha256: str, precision: str,
                          wanted: dict[str, list[Profile]], sources: dict[str, str] | None) -> None:
    """Refuse (one line) an engine set built for another TensorRT, GPU, config, precision, source graph or
    profile range. wanted: graph -> the profiles this version's specs need; sources: graph -> sha256 of the
    ONNX graph the export directory holds now (None when that directory is not at hand)."""
    if m.get("tensorrt_version") != here.tensorrt_version:
        raise EngineMismatchError(f"engines were built with TensorRT {m.get('tensorrt_version')}, this is "
                                  f"TensorRT {here.tensorrt_version}: rebuild with `janusflow build`")
    gpu = m.get("gpu", {})
    if gpu.get("compute_capability") != here.compute_capability or gpu.get("name") != here.gpu_name:
        raise EngineMismatchError(f"engines were built for {gpu.get('name')} (sm {gpu.get('compute_capability')}), "
                                  f"this GPU is {here.gpu_name} (sm {here.compute_capability}): rebuild here")
    if m.get("config_sha256") != config_sha256:
        raise EngineMismatchError("engines were built from another checkpoint config: rebuild")
    if m.get("precision") != precision:
        raise EngineMismatchError(f"engines are {m.get('precision')}, {precision} was asked for")
    for graph, profiles in wanted.items():
        e = m["engines"].get(graph)
        if e is None:
            raise EngineMismatchError(f"no engine for graph {graph!r} in {FILE} (build it with --graphs)")
        if sources is not None and graph in sources and e.get("source", {}).get("sha256") != sources[graph]:
            raise EngineMismatchError(f"engine {graph} was built from another ONNX graph than the export now holds "
                                      f"(re-exported since?): rebuild")
        have = {p["name"]: Profile.from_json(p) for p in e.get("profiles", [])}
        for want in profiles:
            bad = _covers(have[want.name], want) if want.name in have else "(profile missing)"
            if bad is not None:
                raise EngineMismatchError(f"engine {graph} profile {want.name!r} does not cover this version's "
                                          f"range for {bad}: rebuild")


def check_engine_files(engines_dir: Path, m: dict[str, Any], graphs: list[str]) -> None:
    for g in graphs:
        e = m["engines"][g]
        p = engines_dir / e["file"]
        if not p.is_file():
            raise CheckpointError(f"engine {g}: file missing: {p}")
        if sha256_file(p) != e["sha256"]:
            raise CheckpointError(f"engine {g}: {p} sha256 differs from {FILE} (modified?): rebuild")
