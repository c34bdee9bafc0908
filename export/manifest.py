"""OUT/manifest.json: what was exported, from which config, with which tools; and its checks."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from janusflow_ref.config import JanusFlowConfig
from janusflow_ref.errors import CheckpointError

from .specs import GraphSpec

FORMAT_VERSION = 1
VERSION = "0.1.0"  # janusflow-trt
LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "transformers", "diffusers")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    out = {"janusflow-trt": VERSION}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "missing"
    return out


def tensor_entry(spec: GraphSpec, t) -> dict[str, Any]:
    ranges = {d: {w: spec.size(d, w) for w in ("min", "opt", "max")} for d in t.shape if isinstance(d, str)}
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "ranges": ranges}


def graph_entry(spec: GraphSpec, file: str, data_file: str | None, out_dir: Path, opset: int,
                info: dict[str, Any]) -> dict[str, Any]:
    e = {"file": file, "sha256": sha256_file(out_dir / file), "opset": opset,
         "inputs": [tensor_entry(spec, t) for t in spec.inputs],
         "outputs": [tensor_entry(spec, t) for t in spec.outputs], **info}
    if data_file:  # external data (graphs > 2 GB)
        e["external_data"] = {"file": data_file, "sha256": sha256_file(out_dir / data_file)}
    return e


def build_manifest(cfg: JanusFlowConfig, graphs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "janusflow_trt_version": VERSION, "config_sha256": cfg.sha256,
            "config": cfg.raw, "versions": library_versions(), "graphs": graphs}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=False))


def load_checked(artifacts: Path, cfg: JanusFlowConfig, check_files: bool = True) -> dict[str, Any]:
    """The manifest, after refusing a missing one, another config, or a missing/changed graph file."""
    path = Path(artifacts) / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"no manifest.json in {artifacts} (run `janusflow export` first)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("graphs"), dict):
        raise CheckpointError(f"{path}: not a janusflow-trt manifest (no 'graphs')")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}")
    if m.get("config_sha256") != cfg.sha256:
        raise CheckpointError(f"{path} was exported from another config (sha256 {str(m.get('config_sha256'))[:12]}, "
                              f"checkpoint {cfg.sha256[:12]}); re-export")
    if check_files:
        for name, g in m["graphs"].items():
            files = [(g["file"], g["sha256"])]
            if g.get("external_data"):
                files.append((g["external_data"]["file"], g["external_data"]["sha256"]))
            for f, digest in files:
                p = Path(artifacts) / f
                if not p.is_file():
                    raise CheckpointError(f"graph {name}: file missing: {p}")
                if sha256_file(p) != digest:
                    raise CheckpointError(f"graph {name}: {p} sha256 differs from manifest.json (modified?); re-export")
    return m


# -- precision variants: m["graphs"][name]["precisions"][precision] --------------------------------
def precision_entry(out_dir: Path, file: str, data_file: str | None, recipe: dict[str, Any],
                    derived_from: str) -> dict[str, Any]:
    e = {"file": file, "sha256": sha256_file(out_dir / file), "recipe": recipe, "derived_from": derived_from}
    if data_file:
        e["external_data"] = {"file": data_file, "sha256": sha256_file(out_dir / data_file)}
    return e


def exported_precisions(m: dict[str, Any], name: str) -> list[str]:
    g = m.get("graphs", {}).get(name)
    return [] if g is None else ["fp32", *g.get("precisions", {})]


def resolve_graph(m: dict[str, Any], artifacts: Path, name: str, precision: str) -> dict[str, Any]:
    """The manifest entry (file, sha256, ...) of graph `name` at `precision`; refuses one that was not
    exported, or whose file is missing or changed (fp32 files are checked by load_checked)."""
    g = m.get("graphs", {}).get(name)
    if g is None:
        raise CheckpointError(f"{artifacts}/manifest.json has no graph {name!r} (re-export with it)")
    if precision == "fp32":
        return g
    e = g.get("precisions", {}).get(precision)
    if e is None:
        raise CheckpointError(f"graph {name} was not exported at precision {precision} (exported: "
                              f"{','.join(exported_precisions(m, name))}); re-export with --precision fp32,{precision}")
    files = [(e["file"], e["sha256"])] + ([(e["external_data"]["file"], e["external_data"]["sha256"])]
                                          if e.get("external_data") else [])
    for f, digest in files:
        p = Path(artifacts) / f
        if not p.is_file():
            raise CheckpointError(f"graph {name} ({precision}): file missing: {p}")
        if sha256_file(p) != digest:
            raise CheckpointError(f"graph {name} ({precision}): {p} sha256 differs from manifest.json; re-export")
    return e
