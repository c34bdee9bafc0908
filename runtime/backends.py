"""The one backend seam: pipelines call `backend.run(graph, feeds)` and never ask who runs it.

feeds / results are dicts of numpy arrays keyed by the graph spec's input / output names.
- TorchBackend: the graph modules of export/graphs.py, eager (the in-process reference).
- OrtBackend:   ONNX Runtime sessions over an export directory (CPU by default, CUDA if present).
- TrtBackend:   TensorRT engines (runtime/trt_backend.py); GPU only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from janusflow_ref.config import JanusFlowConfig
from janusflow_ref.errors import CheckpointError, JanusFlowError

GRAPHS = ("siglip", "embed", "llm", "gen_enc", "gen_dec", "vae_dec")


class Backend(Protocol):
    name: str

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def io_names(cfg: JanusFlowConfig) -> dict[str, tuple[list[str], list[str]]]:
    """Input/output names per graph, from the one spec per graph (export/specs.py)."""
    from export.specs import build_specs

    return {name: (spec.input_names, spec.output_names) for name, spec in build_specs(cfg).items()}


class TorchBackend:
    """Runs the export graph modules eagerly on the CPU."""

    name = "torch-fast"

    def __init__(self, model, vae=None, threads: int | None = None):
        from export.graphs import EmbedGraph, GenDecGraph, GenEncGraph, LLMGraph, SigLIPGraph, VAEDecGraph

        torch.set_num_threads(threads or physical_cores())
        self.cfg: JanusFlowConfig = model.cfg
        self.modules = {"siglip": SigLIPGraph(model), "embed": EmbedGraph(model), "llm": LLMGraph(model),
                        "gen_enc": GenEncGraph(model), "gen_dec": GenDecGraph(model)}
        if vae is not None:
            self.modules["vae_dec"] = VAEDecGraph(vae)
        self.io = io_names(self.cfg)

    @torch.inference_mode()
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ins, outs = self.io[graph]
        args = [torch.from_numpy(np.require(feeds[n], requirements=("C", "W"))) for n in ins]
        res = self.modules[graph](*args)
        res = res if isinstance(res, tuple) else (res,)
        return {n: r.numpy() for n, r in zip(outs, res, strict=True)}


def read_manifest(artifacts: str | Path, cfg: JanusFlowConfig) -> dict:
    """The export manifest, refused if it is from another config, another janusflow-trt major version,
    or if a graph file is missing or changed."""
    from export.manifest import load_checked
    from runtime import __version__

    manifest = load_checked(Path(artifacts), cfg)
    theirs = str(manifest.get("janusflow_trt_version", "?"))
    if theirs.split(".")[0] != __version__.split(".")[0]:
        raise CheckpointError(f"{artifacts}/manifest.json was written by janusflow-trt {theirs}; this is "
                              f"{__version__}: re-export")
    return manifest


class OrtBackend:
    """ONNX Runtime sessions, one per graph, created lazily; session options set deliberately."""

    name = "ort"

    def __init__(self, artifacts: str | Path, cfg: JanusFlowConfig, threads: int | None = None,
                 providers: list[str] | None = None):
        import onnxruntime as ort

        self.dir = Path(artifacts)
        self.manifest = read_manifest(artifacts, cfg)
        self.cfg = cfg
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or physical_cores()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.enable_mem_pattern = True  # shapes repeat across decode / Euler steps
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-wait on 2 cores
        self.options = so
        avail = ort.get_available_providers()
        self.providers = providers or (["CUDAExecutionProvider", "CPUExecutionProvider"]
                                       if "CUDAExecutionProvider" in avail else ["CPUExecutionProvider"])
        self.sessions: dict = {}
        self.io = io_names(cfg)

    def session(self, graph: str):
        if graph not in self.sessions:
            import onnxruntime as ort

            entry = self.manifest.get("graphs", {}).get(graph)
            if entry is None:
                raise CheckpointError(f"{self.dir}/manifest.json has no graph {graph!r} (re-export with it)")
            path = self.dir / entry["file"]
            if not path.is_file():
                raise CheckpointError(f"graph file missing: {path}")
            try:
                self.sessions[graph] = ort.InferenceSession(str(path), self.options, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
                raise CheckpointError(f"cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        return self.sessions[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.session(graph)
        ins, outs = self.io[graph]
        res = sess.run(outs, {n: feeds[n] for n in ins})
        return dict(zip(outs, res, strict=True))


def make_backend(name: str, model_dir: str | Path, artifacts: str | Path | None, cfg: JanusFlowConfig,
                 threads: int | None = None, need_vae: bool = False, vae_dir: str | Path | None = None):
    if name == "torch-fast":
        from janusflow_ref.vae import load_vae, resolve_vae_dir
        from janusflow_ref.weights import load_model

        vae = load_vae(resolve_vae_dir(model_dir, vae_dir)) if need_vae else None
        return TorchBackend(load_model(model_dir), vae, threads)
    if artifacts is None:
        raise JanusFlowError(f"--backend {name} needs --artifacts DIR (an export directory)")
    if name == "ort":
        return OrtBackend(artifacts, cfg, threads)
    if name == "trt":
        from .trt_backend import TrtBackend

        return TrtBackend(artifacts, cfg)
    raise JanusFlowError(f"unknown backend {name!r}")
