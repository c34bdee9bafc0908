"""`janusflow build`: one TensorRT engine per exported graph, through TensorRT's Python API.

Networks are strongly typed (the only kind TensorRT 11 builds): precision comes from the ONNX graph,
so `--precision` picks which exported variant is parsed, not a builder flag. Profiles come from
export/trt_plan.py (derived from the specs). The timing cache is read before and written after the
builds, atomically, so an interrupted build never leaves a truncated cache; an existing cache is read
only if we wrote it (its sidecar FILE.janusflow records its sha256), never a foreign file replaced.
Everything that needs TensorRT (optional, GPU machines only) is imported inside the functions that need
it; `--dry-run` needs neither TensorRT nor a GPU.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from janusflow_trt.errors import CheckpointError, JanusFlowError
from janusflow_trt.files import check_out_dir, dir_transaction, write_all
from janusflow_trt.janusflow_ref.config import JanusFlowConfig, parse_config

from .engine_manifest import (
    FILE,
    PRECISIONS,
    Target,
    build_engine_manifest,
    engine_entry,
    source_graph,
    write_json_atomic,
)
from .manifest import has_view, load_checked
from .specs import VIEWS, build_specs
from .trt_ops import check_opset, unsupported_ops
from .trt_plan import Buffer, Profile, budget, engine_profiles, plan_buffers


class BuildError(JanusFlowError):
    """TensorRT refused a graph (parser error, build failure)."""


def require_tensorrt(what: str) -> Any:
    """The tensorrt module, or one line saying what is missing (the stubs alone are not TensorRT)."""
    try:
        import tensorrt  # optional (the [tensorrt] extra, GPU machines): imported when asked for

        if not hasattr(tensorrt, "Builder"):  # tensorrt-stubs installs a namespace with no bindings
            raise ImportError
    except ImportError:
        raise JanusFlowError(f"{what} needs TensorRT (pip install 'janusflow-trt[tensorrt]' on a machine with an "
                             f"NVIDIA GPU); it is not installed here") from None
    return tensorrt


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise JanusFlowError(f"{what} needs an NVIDIA GPU with CUDA; torch {torch.__version__} sees none here")


def target_here(trt_version: str) -> Target:
    major, minor = torch.cuda.get_device_capability()
    return Target(trt_version, torch.cuda.get_device_name(), f"{major}.{minor}")


# -- the plan (no TensorRT) ------------------------------------------------------------------------
@dataclass(frozen=True)
class EnginePlan:
    graph: str
    source: dict[str, str] | None  # {"file", "sha256"}; None: the export lacks this precision
    profiles: list[Profile]
    buffers: list[Buffer]


def _onnx_io_dtypes(path: Path) -> dict[str, str]:
    m = onnx.load(str(path), load_external_data=False)
    return {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            for v in [*m.graph.input, *m.graph.output]}


def plan(artifacts: Path, precision: str, graphs: list[str]) -> tuple[JanusFlowConfig, list[EnginePlan]]:
    if precision not in PRECISIONS:
        raise JanusFlowError(f"unknown precision {precision!r}; choose from {','.join(PRECISIONS)}")
    cfg = _manifest_config(artifacts)
    raw = load_checked(artifacts, cfg, check_files=False)
    specs = build_specs(cfg)
    # a view the export holds gets its own engine (the Euler step's LLM without LM head; it costs the
    # device a second copy of the LLM's layer weights, TensorRT engines do not share weights)
    graphs = graphs + [v for v, (p, _) in VIEWS.items() if p in graphs and has_view(raw, v, precision)]
    out = []
    for g in graphs:
        try:
            src: dict[str, str] | None = source_graph(raw, g, precision)
        except CheckpointError:
            src = None
        dtypes = _onnx_io_dtypes(artifacts / src["file"]) if src and (artifacts / src["file"]).is_file() else None
        profiles = engine_profiles(specs, g)
        out.append(EnginePlan(g, src, profiles, plan_buffers(specs[g], profiles, dtypes)))
    return cfg, out


def _manifest_config(artifacts: Path) -> JanusFlowConfig:
    path = artifacts / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"no manifest.json in {artifacts} (run `janusflow export` first)")
    try:
        m = json.loads(path.read_text())
        return parse_config(m["config"], m["config_sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no readable config ({e})") from None


def _mb(n: int) -> str:
    return f"{n / 2**20:10.1f} MiB"


def format_plan(plans: list[EnginePlan], precision: str) -> list[str]:
    lines = [f"plan: {len(plans)} engine(s), precision {precision}, strongly typed"]
    for p in plans:
        src = p.source["file"] if p.source else f"MISSING (export with --precision {precision})"
        lines.append(f"{p.graph}: source {src}")
        for prof in p.profiles:
            dims = ", ".join(f"{k}={'x'.join(map(str, lo))}..{'x'.join(map(str, hi))}"
                             for k, (lo, _, hi) in prof.shapes.items() if not k.startswith("past_key_values.")
                             or k.endswith("0.key"))
            lines.append(f"  profile {prof.name}: {dims}")
    b = budget([x for p in plans for x in p.buffers])
    lines.append("buffer budget at the max profiles (I/O per engine; KV cache once):")
    lines += [f"  {k:10} {_mb(v)}  ({v} bytes)" for k, v in b.items()]
    return lines


# -- the build (TensorRT) --------------------------------------------------------------------------
CACHE_SIDECAR = ".janusflow"  # FILE + this: {"writer", "sha256", "size"} of the cache we last wrote


def read_timing_cache(path: Path | None) -> bytes:
    """Before the work: the cache bytes (b"" when there is none yet). An existing file is read only if
    its sidecar says we wrote exactly these bytes; anything else is refused, not read and replaced."""
    if path is None or not (path.exists() or path.is_symlink()):
        return b""
    if path.is_symlink() or not path.is_file():
        raise JanusFlowError(f"--timing-cache {path} exists and is not a regular file")
    side = path.with_name(path.name + CACHE_SIDECAR)
    try:
        data = path.read_bytes()
        mark = json.loads(side.read_text())
        ours = mark["writer"] == "janusflow build" and mark["sha256"] == hashlib.sha256(data).hexdigest()
    except FileNotFoundError:
        ours = False
    except OSError as e:
        raise JanusFlowError(f"--timing-cache {path}: cannot read ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError):
        ours = False
    if not ours:
        raise JanusFlowError(f"--timing-cache {path} exists but is not a timing cache janusflow build wrote (no "
                             f"matching {side.name}); choose another path or remove it")
    return data


def save_timing_cache(path: Path, data: bytes) -> None:
    """The cache and its sidecar, committed together (files.write_all)."""
    mark = {"writer": "janusflow build", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    write_all([(path, lambda t: Path(t).write_bytes(data)),
               (path.with_name(path.name + CACHE_SIDECAR), lambda t: Path(t).write_text(json.dumps(mark)))],
              what=f"--timing-cache {path}")


def is_engines_dir(d: Path) -> bool:
    return (d / FILE).is_file()


def build_engine(onnx_path: Path, profiles: list[Profile], precision: str, cache: bytes, opt_level: int,
                 workspace_gb: float) -> tuple[bytes, bytes, int]:
    """-> (serialized engine, updated timing cache, device memory one execution context needs)."""
    import tensorrt as trt  # optional, GPU machines only (see require_tensorrt)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data next to the file
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT cannot parse {onnx_path.name}: {errs[0] if errs else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    config.builder_optimization_level = opt_level
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 engines are the parity gate against ORT FP32
    timing = config.create_timing_cache(cache)
    config.set_timing_cache(timing, ignore_mismatch=False)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            prof.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        config.add_optimization_profile(prof)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above)")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    return bytes(memoryview(serialized)), bytes(memoryview(config.get_timing_cache().serialize())), \
        int(engine.device_memory_size_v2)


def build(artifacts: Path, out: Path, precision: str, graphs: list[str], timing_cache: Path | None,
          opt_level: int, workspace_gb: float, progress: bool = True, force: bool = False) -> dict[str, Any]:
    """An existing OUT is replaced only if it is an engines directory and force is set."""
    # before TensorRT: an earlier build killed mid-swap is finished, and OUT and the cache are checked
    out = check_out_dir(out, "--out", force, is_engines_dir, f"an engines directory ({FILE})",
                        [("artifacts", artifacts)])
    cache = read_timing_cache(timing_cache)
    trt = require_tensorrt("janusflow build")
    require_cuda("janusflow build")
    cfg, plans = plan(artifacts, precision, graphs)
    export_manifest = load_checked(artifacts, cfg)  # now also the files' sha256
    missing = [p.graph for p in plans if p.source is None]
    if missing:
        raise CheckpointError(f"the export has no {precision} variant of {missing[0]} (export with --precision "
                              f"{precision})")
    target = target_here(str(trt.__version__))
    with dir_transaction(out, "--out") as tmp:  # swapped in atomically; a crash keeps the old or the new
        engines = {}
        for i, p in enumerate(plans):
            assert p.source is not None
            src = artifacts / p.source["file"]
            model = onnx.load(str(src), load_external_data=False)
            check_opset(model, p.graph)
            bad = unsupported_ops(model)
            if bad:
                raise BuildError(f"graph {p.graph}: op {bad[0]} is not in TensorRT's supported list")
            if progress:
                print(f"[{i + 1}/{len(plans)}] building {p.graph} ({len(p.profiles)} profile(s)) ...",
                      file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            blob, cache, mem = build_engine(src, p.profiles, precision, cache, opt_level, workspace_gb)
            (tmp / f"{p.graph}.plan").write_bytes(blob)
            engines[p.graph] = engine_entry(f"{p.graph}.plan", tmp, p.source, p.profiles, mem,
                                            time.perf_counter() - t0)
            if timing_cache is not None:  # saved after every engine: a later failure keeps what was learnt
                save_timing_cache(timing_cache, cache)
        m = build_engine_manifest(target, precision, export_manifest["config_sha256"], artifacts, engines)
        write_json_atomic(tmp / FILE, m)
    return m
