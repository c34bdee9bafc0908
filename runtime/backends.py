"""The one backend seam: pipelines call `backend.run(graph, feeds)` and never ask who runs it.

feeds / results are dicts of numpy arrays keyed by the graph spec's input / output names.
- TorchBackend: the graph modules of export/graphs.py, eager (the in-process reference).
- OrtBackend:   ONNX Runtime sessions over an export directory (CPU by default, CUDA if present).
- TrtBackend:   TensorRT engines (runtime/trt_backend.py); GPU only.
"""

from __future__ import annotations

import json
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


def llm_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return (["inputs_embeds", "attention_mask", "position_ids", *past],
            ["last_hidden_state", "logits", *present])


IO_NAMES = {
    "siglip": (["pixel_values"], ["image_embeds"]),
    "embed": (["input_ids"], ["inputs_embeds"]),
    "gen_enc": (["z", "t"], ["z_emb", "t_emb", "skip"]),
    "gen_dec": (["hidden", "skip", "t_emb", "z", "cfg_weight", "dt"], ["velocity", "z_next"]),
    "vae_dec": (["latents"], ["image"]),
}


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
        self.io = dict(IO_NAMES, llm=llm_io_names(self.cfg.llm.num_hidden_layers))

    @torch.inference_mode()
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ins, outs = self.io[graph]
        args = [torch.from_numpy(np.require(feeds[n], requirements=("C", "W"))) for n in ins]
        res = self.modules[graph](*args)
        res = res if isinstance(res, tuple) else (res,)
        return {n: r.numpy() for n, r in zip(outs, res, strict=True)}


def read_manifest(artifacts: str | Path, cfg: JanusFlowConfig) -> dict:
    d = Path(artifacts)
    path = d / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"no manifest.json in {d} (run `janusflow export` first)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("config_sha256") != cfg.sha256:
        raise CheckpointError(
            f"{path} was exported from another checkpoint config (sha256 {str(manifest.get('config_sha256'))[:12]}, "
            f"this model {cfg.sha256[:12]}); re-export"
        )
    from runtime import __version__

    if manifest.get("janusflow_trt_version", __version__).split(".")[0] != __version__.split(".")[0]:
        raise CheckpointError(f"{path} was written by janusflow-trt {manifest.get('janusflow_trt_version')}; "
                              f"this is {__version__}: re-export")
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
        self.io = dict(IO_NAMES, llm=llm_io_names(cfg.llm.num_hidden_layers))

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
