"""OUT/manifest.json: what was exported, from which config, with which tools; and its checks."""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from janusflow_trt import __version__
from janusflow_trt.errors import CheckpointError
from janusflow_trt.fingerprint import quick_digest, sha256_file, weights_fingerprint
from janusflow_trt.janusflow_ref.config import JanusFlowConfig

from .specs import GRAPH_NAMES, VIEWS, GraphSpec

FORMAT_VERSION = 2  # 2: per-file size + quick digest, weights fingerprint
VERSION = __version__  # janusflow-trt
LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "transformers", "diffusers")
__all__ = ["sha256_file", "load_checked", "build_manifest", "graph_entry", "write_manifest", "VERSION"]


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


def file_record(out_dir: Path, file: str) -> dict[str, Any]:
    """Full hash (checked by verify) and size + quick digest (checked at every start)."""
    p = out_dir / file
    return {"file": file, "sha256": sha256_file(p), "size": p.stat().st_size, "quick": quick_digest(p)}


def graph_entry(spec: GraphSpec, file: str, data_file: str | None, out_dir: Path, opset: int,
                info: dict[str, Any]) -> dict[str, Any]:
    e = {**file_record(out_dir, file), "opset": opset,
         "inputs": [tensor_entry(spec, t) for t in spec.inputs],
         "outputs": [tensor_entry(spec, t) for t in spec.outputs], **info}
    if data_file:  # external data (graphs > 2 GB)
        e["external_data"] = file_record(out_dir, data_file)
    return e


def build_manifest(cfg: JanusFlowConfig, graphs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    weights = weights_fingerprint(cfg.source) if cfg.source is not None else None
    return {"format_version": FORMAT_VERSION, "janusflow_trt_version": VERSION, "config_sha256": cfg.sha256,
            "weights_fingerprint": weights, "config": cfg.raw, "versions": library_versions(), "graphs": graphs}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=False))


def _version(v: Any) -> tuple[int, ...] | None:
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", str(v))
    return tuple(int(x) for x in m.groups()) if m else None


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _check_record(where: str, r: Any) -> None:
    if not isinstance(r, dict):
        raise CheckpointError(f"{where} is not an object")
    f = r.get("file")
    if not isinstance(f, str) or not f or Path(f).name != f or f in (".", ".."):
        raise CheckpointError(f"{where}.file must be a file name inside the export directory, got {f!r}")
    for k in ("sha256", "quick"):
        if not isinstance(r.get(k), str) or not _HEX64.fullmatch(r[k]):
            raise CheckpointError(f"{where}.{k} must be a sha256 hex digest, got {r.get(k)!r}")
    if not isinstance(r.get("size"), int) or isinstance(r["size"], bool) or r["size"] < 0:
        raise CheckpointError(f"{where}.size must be a non-negative integer, got {r.get('size')!r}")


def _check_entries(path: Path, m: dict[str, Any]) -> None:
    """Every field the loaders use, with its type, before anything is read from the graphs."""
    for name, g in m["graphs"].items():
        if name not in GRAPH_NAMES:
            raise CheckpointError(f"{path}: unknown graph {name!r} (known: {', '.join(GRAPH_NAMES)})")
        where = f"{path}: graphs.{name}"
        _check_record(where, g)
        if not isinstance(g.get("opset"), int) or isinstance(g["opset"], bool):
            raise CheckpointError(f"{where}.opset must be an integer, got {g.get('opset')!r}")
        if g.get("external_data") is not None:
            _check_record(f"{where}.external_data", g["external_data"])
        _check_views(where, g)


def _check_views(where: str, e: dict[str, Any]) -> None:
    views = e.get("views", {})
    if not isinstance(views, dict) or any(v not in VIEWS for v in views):
        raise CheckpointError(f"{where}.views must map view names ({', '.join(VIEWS)}) to files")
    for v, r in views.items():
        _check_record(f"{where}.views.{v}", r)
        if r.get("external_data") is not None:
            _check_record(f"{where}.views.{v}.external_data", r["external_data"])


def _check_file(artifacts: Path, label: str, r: dict[str, Any], full: bool) -> None:
    p = artifacts / r["file"]
    if not p.is_file():
        raise CheckpointError(f"{label}: file missing: {p}")
    if p.stat().st_size != r["size"]:
        raise CheckpointError(f"{label}: {p} is {p.stat().st_size} bytes, manifest.json says "
                              f"{r['size']} (truncated or modified?); re-export")
    if quick_digest(p) != r["quick"] or full and sha256_file(p) != r["sha256"]:
        raise CheckpointError(f"{label}: {p} sha256 differs from manifest.json (modified?); re-export")


def _records(e: dict[str, Any]) -> list[dict[str, Any]]:
    """A graph (or precision) entry's file records: the graph file, its external data if any, and its
    views' files (a view's external data is its parent's data file: listed once)."""
    out = [e] + ([e["external_data"]] if e.get("external_data") else [])
    for v in e.get("views", {}).values():
        out += [r for r in _records(v) if r["file"] not in {o["file"] for o in out}]
    return out


def _check_files(artifacts: Path, m: dict[str, Any], full: bool) -> None:
    for name, g in m["graphs"].items():
        for r in _records(g):
            _check_file(artifacts, f"graph {name}", r, full)


def read_json_manifest(path: Path, key: str, writer: str) -> dict[str, Any]:
    """A JSON manifest (export's manifest.json, build's engines.json) as a dict holding the object `key`;
    anything else is refused in one line (missing -> run `writer` first)."""
    if not path.is_file():
        raise CheckpointError(f"no {path.name} in {path.parent} (run `{writer}` first)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(m, dict) or not isinstance(m.get(key), dict):
        raise CheckpointError(f"{path}: not a janusflow-trt {path.stem} (no '{key}')")
    return m


def load_checked(artifacts: Path, cfg: JanusFlowConfig, check_files: bool = True, full: bool = False
                 ) -> dict[str, Any]:
    """The manifest, after refusing a missing or malformed one, another version, config or checkpoint,
    or a missing/changed graph file. Files: size + quick digest; full=True: full sha256 too (verify)."""
    artifacts = Path(artifacts)
    path = artifacts / "manifest.json"
    m = read_json_manifest(path, "graphs", "janusflow export")
    theirs, ours = _version(m.get("janusflow_trt_version")), _version(VERSION)
    assert ours is not None, VERSION
    if theirs is None:
        raise CheckpointError(f"{path}: janusflow_trt_version {m.get('janusflow_trt_version')!r} is not x.y.z")
    if theirs > ours or theirs[0] != ours[0]:
        raise CheckpointError(f"{path} was written by janusflow-trt {'.'.join(map(str, theirs))}; this is {VERSION}"
                              f"{' (older)' if theirs > ours else ''}: re-export with this version")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}; "
                              "re-export")
    _check_entries(path, m)
    if m.get("config_sha256") != cfg.sha256:
        raise CheckpointError(f"{path} was exported from another config (sha256 {str(m.get('config_sha256'))[:12]}, "
                              f"checkpoint {cfg.sha256[:12]}); re-export")
    # a checkpoint dir without weights (enough for the ort backend) has nothing to confuse them with
    local = weights_fingerprint(cfg.source) if cfg.source is not None else None
    if local is not None and m.get("weights_fingerprint") != local:
        raise CheckpointError(f"{path} was exported from other weights than {cfg.source} (same config.json, "
                              "different model.safetensors); re-export")
    if check_files:
        _check_files(artifacts, m, full)
    return m


# -- precision variants: m["graphs"][name]["precisions"][precision] --------------------------------
def precision_entry(out_dir: Path, file: str, data_file: str | None, recipe: dict[str, Any],
                    derived_from: str) -> dict[str, Any]:
    e = {**file_record(out_dir, file), "recipe": recipe, "derived_from": derived_from}
    if data_file:
        e["external_data"] = file_record(out_dir, data_file)
    return e


def listed_files(m: dict[str, Any]) -> set[str]:
    """Every name in an export directory that its manifest accounts for (graphs of every precision,
    their external data, the calibration set's folder)."""
    names = {"manifest.json"}
    for g in m["graphs"].values():
        for e in [g, *g.get("precisions", {}).values()]:
            names.update(r["file"] for r in _records(e))
    cal = m.get("calibration")
    if isinstance(cal, dict) and isinstance(cal.get("dir"), str):
        names.add(cal["dir"])
    return names


def is_export_dir(d: Path) -> bool:
    """An earlier export of ours: a manifest of ours, and nothing in d it does not account for."""
    try:
        m = json.loads((d / "manifest.json").read_text())
        listed = listed_files(m)
        assert "janusflow_trt_version" in m and "format_version" in m
    except (OSError, ValueError, KeyError, TypeError, AttributeError, AssertionError):
        return False
    return {p.name for p in d.iterdir()} <= listed


def exported_precisions(m: dict[str, Any], name: str) -> list[str]:
    g = m.get("graphs", {}).get(name)
    return [] if g is None else ["fp32", *g.get("precisions", {})]


def lookup_entry(m: dict[str, Any], name: str, precision: str) -> dict[str, Any]:
    """The manifest entry of graph (or view) `name` at `precision`, files unchecked: fp32 is the graph entry
    itself, another precision its variant under entry["precisions"], a view is recorded beside its
    parent's entry at each precision (export/views.py). Refuses one that was not exported, in one line."""
    if name in VIEWS:
        parent = VIEWS[name][0]
        v = lookup_entry(m, parent, precision).get("views", {}).get(name)
        if v is None:
            raise CheckpointError(f"graph {parent} ({precision}) has no {name} view (exported by an older version; "
                                  "re-export)")
        return v
    g = m.get("graphs", {}).get(name)
    if g is None:
        raise CheckpointError(f"the export manifest has no graph {name!r} (export it first)")
    if precision == "fp32":
        return g
    e = g.get("precisions", {}).get(precision)
    if e is None:
        raise CheckpointError(f"graph {name} was not exported at precision {precision} (exported: "
                              f"{','.join(exported_precisions(m, name))}); re-export with --precision fp32,{precision}")
    return e


def resolve_graph(m: dict[str, Any], artifacts: Path, name: str, precision: str, full: bool = False
                  ) -> dict[str, Any]:
    """The manifest entry (file, sha256, ...) of graph `name` at `precision`; refuses one that was not
    exported, or whose file is missing or changed (fp32 files are checked by load_checked). Files: size +
    quick digest; full=True: full sha256 too (verify)."""
    if name in VIEWS:  # a view is recorded beside its parent's file at each precision
        resolve_graph(m, artifacts, VIEWS[name][0], precision, full)  # the parent's files checked too
        return lookup_entry(m, name, precision)
    e = lookup_entry(m, name, precision)
    if precision == "fp32":
        return e
    _check_record(f"graphs.{name}.precisions.{precision}", e)
    _check_views(f"graphs.{name}.precisions.{precision}", e)
    for r in _records(e):
        _check_file(Path(artifacts), f"graph {name} ({precision})", r, full)
    return e


def has_view(m: dict[str, Any], view: str, precision: str) -> bool:
    """Whether the export holds `view` at `precision` (exports before views, or a parent the Extractor
    could not cut, have none: callers run the parent graph instead)."""
    g = m.get("graphs", {}).get(VIEWS[view][0], {})
    e = g if precision == "fp32" else g.get("precisions", {}).get(precision, {})
    return view in e.get("views", {})


# -- the quality gate's record: m["quality_gate"] (janusflow_trt/quality_gate.py) --------------------
def gate_record(m: dict[str, Any], precision: str) -> dict[str, Any] | None:
    """The export's measurement of `precision` against FP32 (None: exported without a gate, or fp32)."""
    return (m.get("quality_gate") or {}).get("precisions", {}).get(precision)


def gate_lines(m: dict[str, Any], precision: str) -> list[str]:
    """The gate's figures as `verify` and `quality` print them."""
    r = gate_record(m, precision)
    if r is None:
        return [f"quality gate: no record for {precision} (exported without a gate)"] if precision != "fp32" else []
    g = m["quality_gate"]
    if "figures" not in r:
        return [f"quality gate: {r.get('miss', 'not measured')}"]
    f = r["figures"]
    t2i = ", ".join(f"CFG {w}: latent cosine {v['latent_cosine_min']:.6f}, PSNR {v['psnr_db_min']:.2f} dB"
                    for w, v in f["t2i"].items())
    worst = min((o["cosine"], f"{n} {k}") for n, outs in f["graphs"].items() for k, o in outs.items())
    excl = "; ".join(f"{e['graph']}:{e['node']} ({e['weight_bytes'] / 2**20:.2f} MiB, alone {e['cosine_alone']:.5f}"
                     + (f", {e['graph']} {e['graph_ms_before']:.1f} -> {e['graph_ms_after']:.1f} ms "
                        f"(x{e['graph_time_ratio']:.2f})" if e.get("graph_time_ratio") else "") + ")"
                     for e in r.get("exclusions", []))
    return [f"quality gate ({g['gate']['name']}: {g['heldout']['pairs']} held-out pairs x {g['gate']['tokens']} "
            f"tokens, {g['heldout']['prompts']} prompts x {g['gate']['steps']} steps): "
            f"{'targets met' if r['met'] else 'MISSED: ' + r.get('miss', '')}",
            f"  chat teacher-forced top-1 min {f['chat']['teacher_forced_top1_min']:.4f} (mean "
            f"{f['chat']['teacher_forced_top1']:.4f}), free-running agreement {f['chat']['free_agreement']:.4f}",
            f"  {t2i}", f"  every graph output cosine >= {worst[0]:.6f} (worst: {worst[1]})",
            *([f"  kept float by the gate's search: {excl}"] if excl else [])]


_WARNED: set[tuple[str, str]] = set()


def warn_quality_miss(m: dict[str, Any], artifacts: Path, precision: str) -> None:
    """Once per process and variant: a variant written with --accept-quality-miss says so on load."""
    r = gate_record(m, precision)
    key = (str(Path(artifacts).resolve()), precision)
    if r and r.get("accepted_miss") and key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {artifacts} {precision} was exported with --accept-quality-miss: {r.get('miss', '')}",
              file=sys.stderr, flush=True)
