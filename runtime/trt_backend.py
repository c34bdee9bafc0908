"""The TensorRT slot of the backend seam: engines from `janusflow build`, refused in one line when they
were built for another TensorRT, GPU, config, source graph or profile range (export/engine_manifest.py).

`run(graph, feeds)` binds the feeds (device tensors) as the engine's input addresses, enqueues on
self.stream with no host sync and returns the engine's output buffers: the step functions' fixed
buffers then stay fixed across steps, which is what CUDA-graph capture of a whole step needs.
GPU-only modules (tensorrt, runtime/trt_engine.py) are imported after the requirements are checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from janusflow_trt.errors import InputError
from janusflow_trt.export.engine_manifest import (
    check_engine_files,
    check_engine_manifest,
    read_engine_manifest,
    source_graph,
)
from janusflow_trt.export.specs import VIEWS, build_specs, precision_variant
from janusflow_trt.export.trt_build import require_cuda, require_tensorrt, target_here
from janusflow_trt.export.trt_plan import engine_profiles
from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.precision import Precision

from .backends import spec_kv_dtype


def export_sources(m: dict[str, Any]) -> dict[str, str] | None:
    """graph -> sha256 of the source ONNX the export directory holds now; None if that directory is gone
    (engines deployed on their own: the engine files' own sha256 is still checked)."""
    path = Path(m.get("source_artifacts", "")) / "manifest.json"
    if not path.is_file():
        return None
    exp = json.loads(path.read_text())
    out = {}
    for g in m["engines"]:
        try:
            out[g] = source_graph(exp, g, m["precision"])["sha256"]
        except Exception:  # the graph or variant is gone from the export: a mismatch, reported by the check
            out[g] = "missing"
    return out


def pick_profile(graph: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """The engine profile a call falls in (llm: one new token -> decode, more -> prefill; llm_gen: euler)."""
    if graph == "llm":
        return "decode" if shapes["inputs_embeds"][1] == 1 else "prefill"
    return "euler" if graph == "llm_gen" else "all"


class TrtBackend:
    name = "trt"

    capturable = True  # engines enqueue on self.stream over bound buffers (runtime/cuda_graph.StepRunner)

    def __init__(self, artifacts: str | Path, cfg: JanusFlowConfig, precision: str):
        trt = require_tensorrt("--backend trt")
        require_cuda("--backend trt")
        self.dir = Path(artifacts)
        m = read_engine_manifest(self.dir)
        self.precision = Precision(precision)
        self.specs = {n: precision_variant(s, precision) for n, s in build_specs(cfg).items()}
        self.kv_dtype = spec_kv_dtype(self.specs)
        graphs = list(m["engines"])
        wanted = {g: engine_profiles(self.specs, g) for g in graphs}
        check_engine_manifest(m, target_here(str(trt.__version__)), cfg.sha256, precision, wanted,
                              export_sources(m))
        check_engine_files(self.dir, m, graphs)
        from .trt_engine import Engine  # GPU-only (tensorrt bindings): after every check that needs none

        self.profile_index = {g: [p["name"] for p in m["engines"][g]["profiles"]] for g in graphs}
        self.view_parent: dict[str, str] = {}
        logger = trt.Logger(trt.Logger.WARNING)
        self.engines = {g: Engine(self.dir / m["engines"][g]["file"], logger) for g in graphs}
        for v, (p, _) in VIEWS.items():  # engines built without the view: the parent engine, its prefill profile
            if v not in self.engines and p in self.engines:
                self.engines[v], self.view_parent[v] = self.engines[p], p
        size = max(e.device_memory_size for e in self.engines.values())
        self.scratch = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")  # shared: one engine at a time
        for e in self.engines.values():
            e.set_device_memory(self.scratch)
        self.stream = torch.cuda.Stream()

    def buffers(self, graph: str, shapes: dict[str, tuple[int, ...]], external: dict | None = None) -> dict:
        """The graph's device buffers for these input shapes (allocated on first use, then reused)."""
        spec = self.specs[graph]
        b = shapes[spec.inputs[0].name][0]
        if spec.syms.get("B") is not None and spec.syms["B"].multiple_of > 1 and b % spec.syms["B"].multiple_of:
            raise InputError(f"{graph}: batch {b} is not a whole number of CFG pairs")
        parent = self.view_parent.get(graph)
        prof = self.profile_index[parent or graph].index(pick_profile(parent or graph, shapes))
        return self.engines[graph].bind(prof, shapes, self.stream, external)

    def enqueue(self, graph: str, capture: bool = False) -> None:
        e = self.engines[graph]
        (e.replay if capture else e.enqueue)(self.stream)

    @property
    def device(self) -> Any:
        return torch.device("cuda")

    def graph_file(self, graph: str) -> Path | None:
        return None  # engines, not ONNX files

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        """The feeds (device tensors) bound as the engine's inputs, enqueued on self.stream, no host sync;
        -> the engine's output buffers (rewritten by the next call of this graph). Called from another
        stream, the two streams wait for each other on the device (the feeds were written there, the
        outputs are read there); inside a captured step the caller is on self.stream already."""
        spec = self.specs[graph]
        bufs = self.buffers(graph, {t.name: tuple(feeds[t.name].shape) for t in spec.inputs},
                            {n: feeds[n] for n in spec.input_names})
        caller = torch.cuda.current_stream()
        if caller != self.stream:
            self.stream.wait_stream(caller)
        self.enqueue(graph)
        if caller != self.stream:
            caller.wait_stream(self.stream)
        return {n: bufs[n] for n in spec.output_names}
