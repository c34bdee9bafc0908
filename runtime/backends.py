"""The one backend seam: pipelines call `backend.run(graph, feeds)` and never ask who runs it.

feeds / results are dicts of torch tensors on `backend.device`, keyed by the graph spec's input / output
names: zero-copy numpy on the CPU, device memory on a GPU, bound by pointer (ONNX Runtime IOBinding,
TensorRT tensor addresses). `run` enqueues and returns without a host sync where the backend has a
stream; results are the backend's own buffers, reused by later calls (see OutputBuffers).
- TorchBackend: the graph modules of export/graphs.py, eager, FP32 or BF16 (runtime/torch_backend.py).
- OrtBackend:   ONNX Runtime sessions over an export directory (CPU by default, CUDA if present).
- TrtBackend:   TensorRT engines (runtime/trt_backend.py); GPU only.
- torch-cuda: the same TorchBackend on CUDA with a stream, captured per step (runtime/torch_cuda.py).
Which backends exist, what each needs and which precisions it runs: runtime/registry.py; built by
runtime/factory.py.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import psutil
import torch

from janusflow_trt import __version__
from janusflow_trt.errors import CheckpointError, InputError
from janusflow_trt.export.manifest import load_checked, resolve_graph, warn_quality_miss
from janusflow_trt.export.specs import VIEWS, GraphSpec, build_specs, precision_variant
from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.precision import EXPORTED, Precision


class Backend(Protocol):
    """Everything a pipeline uses of a backend (read-only: a plain attribute or a property serves)."""

    @property
    def name(self) -> str: ...

    @property
    def device(self) -> torch.device:
        """Where run()'s tensors live."""
        ...

    @property
    def kv_dtype(self) -> torch.dtype:
        """The LLM graph's K/V dtype at this backend's precision."""
        ...

    @property
    def specs(self) -> dict[str, GraphSpec]:
        """The graphs' I/O at this backend's precision."""
        ...

    @property
    def capturable(self) -> bool:
        """run() enqueues on `stream` over fixed buffers: a step can be captured as a CUDA graph."""
        ...

    @property
    def stream(self) -> Any:
        """The torch.cuda.Stream where capturable, else None."""
        ...

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def graph_file(self, graph: str) -> Path | None:
        """The ONNX file this backend runs for `graph` (None: not an ONNX-file backend)."""
        ...


class SeamWrapper:
    """A backend around a backend (the calibration Recorder, the benchmark's Timer): forwards the whole
    Protocol; subclasses override run() and call self.inner.run."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name, self.device, self.kv_dtype = inner.name, inner.device, inner.kv_dtype
        self.specs, self.capturable, self.stream = inner.specs, inner.capturable, inner.stream

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.inner.run(graph, feeds)

    def graph_file(self, graph: str) -> Path | None:
        return self.inner.graph_file(graph)


def spec_kv_dtype(specs: dict[str, GraphSpec]) -> torch.dtype:
    """The LLM graph's K/V dtype at a precision variant of the specs (FP16 for fp16 graphs)."""
    return getattr(torch, next(t.dtype for t in specs["llm"].inputs if t.name.startswith("past_")))


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def read_manifest(artifacts: str | Path, cfg: JanusFlowConfig) -> dict:
    """The export manifest, refused if it is from another config, another janusflow-trt major version,
    or if a graph file is missing or changed."""
    manifest = load_checked(Path(artifacts), cfg)
    theirs = str(manifest.get("janusflow_trt_version", "?"))
    if theirs.split(".")[0] != __version__.split(".")[0]:
        raise CheckpointError(f"{artifacts}/manifest.json was written by janusflow-trt {theirs}; this is "
                              f"{__version__}: re-export")
    return manifest


def read_manifest_at(artifacts: str | Path, cfg: JanusFlowConfig, precisions: list[str]) -> dict:
    """read_manifest, and every graph of the export present and unchanged at each of `precisions`:
    a precision that was not exported is refused up front, in one line."""
    manifest = read_manifest(artifacts, cfg)
    for p in precisions:
        for g in manifest.get("graphs", {}):
            resolve_graph(manifest, Path(artifacts), g, p)
        warn_quality_miss(manifest, Path(artifacts), p)
    return manifest


class OrtBackend:
    """ONNX Runtime sessions, one per graph, created lazily; session options set deliberately."""

    name = "ort"
    capturable, stream = False, None  # the CUDA provider runs on a stream of its own

    def __init__(self, artifacts: str | Path, cfg: JanusFlowConfig, threads: int | None = None,
                 providers: list[str] | None = None, precision: str = Precision.FP32):
        if precision not in EXPORTED:  # bf16: a torch-backend dtype, never in an export directory
            raise InputError(f"precision {precision} is not an exported variant; ONNX Runtime runs "
                             f"{', '.join(EXPORTED)}")
        self.dir = Path(artifacts)
        self.manifest = read_manifest_at(artifacts, cfg, [precision])
        self.precision = Precision(precision)
        self.specs = {n: precision_variant(s, precision) for n, s in build_specs(cfg).items()}  # I/O dtypes
        self.kv_dtype = spec_kv_dtype(self.specs)
        # a view (llm_gen) runs on its parent's session with only the view's outputs bound: ONNX Runtime then
        # runs only the nodes those outputs need (no LM head), as fast as a session of the view's own file
        # (full size, CPU: Euler-step call 7.81 s vs 7.85 s, outputs equal), and the weights are loaded
        # once: a second session would hold a second copy (FP32 5.5 GB, FP16 5.8 GB at full size). The view
        # files are for TensorRT, whose engines cannot prune (docs/gpu.md).
        self.view_parent = {v: p for v, (p, _) in VIEWS.items()}
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
        # torch buffers on the device the first provider runs on (ORT binds their pointers)
        self.device = torch.device("cpu" if self.providers[0] == "CPUExecutionProvider" else "cuda")
        self.buffers = OutputBuffers(lambda shape, dtype: torch.empty(
            shape, dtype=getattr(torch, dtype), device=self.device))

    def graph_file(self, graph: str) -> Path:
        return self.dir / resolve_graph(self.manifest, self.dir, self.view_parent.get(graph, graph),
                                        self.precision)["file"]

    def session(self, graph: str):
        if graph not in self.sessions:
            path = self.graph_file(graph)
            if not path.is_file():
                raise CheckpointError(f"graph file missing: {path}")
            try:
                sess = ort.InferenceSession(str(path), self.options, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
                raise CheckpointError(f"cannot load {path}: {str(e).splitlines()[0][:200]}") from None
            spec = self.specs[graph]
            have = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
            if have != (spec.input_names, spec.output_names):
                raise CheckpointError(f"{path} has other inputs/outputs than this version's {graph} spec; re-export")
            self.sessions[graph] = sess
        return self.sessions[graph]

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IOBinding over torch tensors on self.device: inputs and outputs bound by pointer (CPU or CUDA),
        nothing copied or converted; outputs are reused buffers (OutputBuffers)."""
        sess, spec = self.session(self.view_parent.get(graph, graph)), self.specs[graph]
        binding = sess.io_binding()
        sizes: dict[str, int] = {}
        dev, idx = self.device.type, self.device.index or 0
        for t in spec.inputs:
            x = feeds[t.name]
            assert x.dtype == getattr(torch, t.dtype) and x.is_contiguous() and x.device == self.device, \
                f"{graph}.{t.name}: {x.dtype} {x.device} tensor, the graph binds {t.dtype} on {self.device}"
            sizes.update((d, n) for d, n in zip(t.shape, x.shape, strict=True) if isinstance(d, str))
            binding.bind_input(t.name, dev, idx, np.dtype(t.dtype), list(x.shape), x.data_ptr())
        shapes = {t.name: tuple(sizes[d] if isinstance(d, str) else d for d in t.shape) for t in spec.outputs}
        out = self.buffers.get(graph, shapes, {t.name: t.dtype for t in spec.outputs})
        for t in spec.outputs:
            buf = out[t.name]
            binding.bind_output(t.name, dev, idx, np.dtype(t.dtype), list(buf.shape), buf.data_ptr())
        if dev == "cuda":  # ORT's CUDA EP runs on its own stream: torch's writes must be done
            torch.cuda.current_stream().synchronize()  # (a wait, no copy; Run returns after ORT's stream)
        sess.run_with_iobinding(binding)
        return out

    def release(self, graphs: list[str]) -> None:
        """Drop the sessions of `graphs` (a view's parent too: name the view's parent only when neither
        runs again) and every output buffer (other graphs' come back at their next call, at most one
        allocation each); a later run() loads a dropped session again. At full size a chat's SigLIP session
        and its prefill buffers are ~2 GB that text-to-image never reads (the quality gate: quality.py)."""
        for g in graphs:
            self.sessions.pop(self.view_parent.get(g, g), None)
        self.buffers.pool.clear()


def release(backend: Backend, graphs: list[str]) -> None:
    """A pipeline done with `graphs` frees what running them holds where the backend can (OrtBackend.release,
    through any SeamWrapper); the torch and TensorRT backends keep theirs (one set of modules / engines
    loaded up front, the engines' buffers bound into captured steps)."""
    while isinstance(backend, SeamWrapper):
        backend = backend.inner
    if isinstance(backend, OrtBackend):
        backend.release(graphs)


class OutputBuffers:
    """Preallocated outputs of each graph, per set of output shapes: two sets used in turn, so a result
    stays valid until the second next call of the same graph with the same shapes (callers copy what
    they keep longer; alternating lets a step's output feed the next step's input, as z_next does).

    At most `max_shapes` shape sets are kept per graph, least recently used evicted: every prompt
    length is a new prefill shape, and at full size one prefill's outputs are ~240 MB. An evicted
    buffer still held by a caller stays alive until the caller lets go of it."""

    def __init__(self, empty: Callable[[tuple[int, ...], str], Any], max_shapes: int = 4):
        """empty(shape, dtype string): the allocator (torch tensors on the backend's device)."""
        self.max_shapes, self.empty = max_shapes, empty
        self.pool: dict[str, OrderedDict[tuple, list]] = {}

    def get(self, graph: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> dict[str, Any]:
        lru = self.pool.setdefault(graph, OrderedDict())
        key = tuple(shapes.values())
        if key not in lru:
            pair = [{n: self.empty(s, dtypes[n]) for n, s in shapes.items()} for _ in range(2)]
            lru[key] = [pair, 0]
            if len(lru) > self.max_shapes:
                lru.popitem(last=False)
        lru.move_to_end(key)
        entry = lru[key]
        pair, turn = entry
        entry[1] = 1 - turn
        return dict(pair[turn])

    def nbytes(self) -> int:
        return sum(a.nbytes for lru in self.pool.values() for pair, _ in lru.values() for d in pair
                   for a in d.values())
