"""The one backend seam: pipelines call `backend.run(graph, feeds)` and never ask who runs it.

feeds / results are dicts of numpy arrays keyed by the graph spec's input / output names.
`run_tensors(graph, feeds)` is the device-resident form: torch tensors on `backend.device` in and out,
nothing converted (the decode and Euler loops: runtime/decode.py, euler_step.euler_loop_tensors).
- TorchBackend: the graph modules of export/graphs.py, eager (the in-process reference).
- OrtBackend:   ONNX Runtime sessions over an export directory (CPU by default, CUDA if present).
- TrtBackend:   TensorRT engines (runtime/trt_backend.py); GPU only.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from janusflow_trt.errors import CheckpointError, JanusFlowError
from janusflow_trt.janusflow_ref.config import JanusFlowConfig


class Backend(Protocol):
    name: str
    device: Any  # torch.device of run_tensors' buffers

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def run_tensors(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class TorchBackend:
    """Runs the export graph modules eagerly on the CPU."""

    name = "torch-fast"
    device = torch.device("cpu")

    def __init__(self, model, vae=None, threads: int | None = None):
        from janusflow_trt.export.graphs import EmbedGraph, GenDecGraph, GenEncGraph, LLMGraph, SigLIPGraph

        torch.set_num_threads(threads or physical_cores())
        self.cfg: JanusFlowConfig = model.cfg
        self.modules: dict[str, Any] = {  # torch modules (mypy sees torch as Any)
            "siglip": SigLIPGraph(model), "embed": EmbedGraph(model), "llm": LLMGraph(model),
            "llm_gen": LLMGraph(model, hidden_only=True), "gen_enc": GenEncGraph(model), "gen_dec": GenDecGraph(model)}
        if vae is not None:
            self.add_vae(vae)
        from janusflow_trt.export.specs import build_specs

        self.specs = build_specs(self.cfg)

    def add_vae(self, vae) -> None:
        from janusflow_trt.export.graphs import VAEDecGraph

        self.modules["vae_dec"] = VAEDecGraph(vae)

    @torch.inference_mode()
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ins, outs = self.specs[graph].input_names, self.specs[graph].output_names
        args = [torch.from_numpy(np.require(feeds[n], requirements=("C", "W"))) for n in ins]
        res = self.modules[graph](*args)
        res = res if isinstance(res, tuple) else (res,)
        return {n: r.numpy() for n, r in zip(outs, res, strict=True)}


    @torch.inference_mode()
    def run_tensors(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The device-resident form of run(): torch tensors in and out, nothing converted."""
        res = self.modules[graph](*[feeds[n] for n in self.specs[graph].input_names])
        res = res if isinstance(res, tuple) else (res,)
        return dict(zip(self.specs[graph].output_names, res, strict=True))


def read_manifest(artifacts: str | Path, cfg: JanusFlowConfig) -> dict:
    """The export manifest, refused if it is from another config, another janusflow-trt major version,
    or if a graph file is missing or changed."""
    from janusflow_trt.export.manifest import load_checked
    from janusflow_trt.runtime import __version__

    manifest = load_checked(Path(artifacts), cfg)
    theirs = str(manifest.get("janusflow_trt_version", "?"))
    if theirs.split(".")[0] != __version__.split(".")[0]:
        raise CheckpointError(f"{artifacts}/manifest.json was written by janusflow-trt {theirs}; this is "
                              f"{__version__}: re-export")
    return manifest


def read_manifest_at(artifacts: str | Path, cfg: JanusFlowConfig, precisions: list[str]) -> dict:
    """read_manifest, and every graph of the export present and unchanged at each of `precisions`:
    a precision that was not exported is refused up front, in one line."""
    from janusflow_trt.export.manifest import resolve_graph

    manifest = read_manifest(artifacts, cfg)
    for p in precisions:
        for g in manifest.get("graphs", {}):
            resolve_graph(manifest, Path(artifacts), g, p)
    return manifest


class OrtBackend:
    """ONNX Runtime sessions, one per graph, created lazily; session options set deliberately."""

    name = "ort"

    def __init__(self, artifacts: str | Path, cfg: JanusFlowConfig, threads: int | None = None,
                 providers: list[str] | None = None, precision: str = "fp32"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise JanusFlowError("--backend ort needs ONNX Runtime: pip install 'janusflow-trt[cpu]' "
                                 "(or '[gpu]' with CUDA)") from None

        from janusflow_trt.export.manifest import has_view
        from janusflow_trt.export.specs import VIEWS, build_specs, precision_variant

        self.dir = Path(artifacts)
        self.manifest = read_manifest_at(artifacts, cfg, [precision])
        self.precision = precision
        self.specs = {n: precision_variant(s, precision) for n, s in build_specs(cfg).items()}  # I/O dtypes
        # a view the export lacks (older export): its parent runs, and only the view's outputs are returned
        self.view_parent = {v: p for v, (p, _) in VIEWS.items() if not has_view(self.manifest, v, precision)}
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
        self.on_cpu = self.providers[0] == "CPUExecutionProvider"
        self.buffers = OutputBuffers()
        # run_tensors(): torch buffers on the device the first provider runs on (ORT binds their pointers)
        self.device = torch.device("cpu" if self.on_cpu else "cuda")
        self.tensor_buffers = OutputBuffers(empty=lambda shape, dtype: torch.empty(
            shape, dtype=getattr(torch, dtype), device=self.device))

    def session(self, graph: str):
        if graph not in self.sessions:
            import onnxruntime as ort

            from janusflow_trt.export.manifest import resolve_graph

            entry = resolve_graph(self.manifest, self.dir, graph, self.precision)
            path = self.dir / entry["file"]
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

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """IOBinding: inputs bound in place (no copy), outputs written into preallocated buffers that
        are reused across calls (see OutputBuffers for how long a result stays valid)."""
        if graph in self.view_parent:
            out = self.run(self.view_parent[graph], feeds)
            return {n: out[n] for n in self.specs[graph].output_names}
        sess, spec = self.session(graph), self.specs[graph]
        binding = sess.io_binding()
        sizes: dict[str, int] = {}
        for t in spec.inputs:
            a = np.ascontiguousarray(feeds[t.name], dtype=t.dtype)
            sizes.update((d, n) for d, n in zip(t.shape, a.shape, strict=True) if isinstance(d, str))
            binding.bind_cpu_input(t.name, a)
        if not self.on_cpu:
            for t in spec.outputs:
                binding.bind_output(t.name, "cuda")
            sess.run_with_iobinding(binding)
            return dict(zip(spec.output_names, binding.copy_outputs_to_cpu(), strict=True))
        shapes = {t.name: tuple(sizes[d] if isinstance(d, str) else d for d in t.shape) for t in spec.outputs}
        out = self.buffers.get(graph, shapes, {t.name: t.dtype for t in spec.outputs})
        for name, buf in out.items():
            binding.bind_output(name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
        sess.run_with_iobinding(binding)
        return out

    def run_tensors(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IOBinding over torch tensors on self.device: inputs and outputs bound by pointer (CPU or CUDA),
        nothing copied or converted; outputs are reused buffers, as run()'s."""
        if graph in self.view_parent:
            out = self.run_tensors(self.view_parent[graph], feeds)
            return {n: out[n] for n in self.specs[graph].output_names}
        sess, spec = self.session(graph), self.specs[graph]
        binding = sess.io_binding()
        sizes: dict[str, int] = {}
        for t in spec.inputs:
            x = feeds[t.name]
            assert x.dtype == getattr(torch, t.dtype) and x.is_contiguous() and x.device == self.device, \
                f"{graph}.{t.name}: {x.dtype} {x.device} tensor, the graph binds {t.dtype} on {self.device}"
            sizes.update((d, n) for d, n in zip(t.shape, x.shape, strict=True) if isinstance(d, str))
            binding.bind_input(t.name, self.device.type, self.device.index or 0, np.dtype(t.dtype), list(x.shape),
                               x.data_ptr())
        shapes = {t.name: tuple(sizes[d] if isinstance(d, str) else d for d in t.shape) for t in spec.outputs}
        out = self.tensor_buffers.get(graph, shapes, {t.name: t.dtype for t in spec.outputs})
        for t in spec.outputs:
            buf = out[t.name]
            binding.bind_output(t.name, self.device.type, self.device.index or 0, np.dtype(t.dtype), list(buf.shape),
                                buf.data_ptr())
        if self.device.type == "cuda":  # ORT's CUDA EP runs on its own stream: torch's writes must be done
            torch.cuda.current_stream().synchronize()  # (a wait, no copy; Run returns after ORT's stream)
        sess.run_with_iobinding(binding)
        return out

    @property
    def kv_dtype(self) -> np.dtype:
        return np.dtype(self.specs["llm"].inputs[3].dtype)


class OutputBuffers:
    """Preallocated outputs of each graph, per set of output shapes: two sets used in turn, so a result
    stays valid until the second next call of the same graph with the same shapes (callers copy what
    they keep longer; alternating lets a step's output feed the next step's input, as z_next does).

    At most `max_shapes` shape sets are kept per graph, least recently used evicted: every prompt
    length is a new prefill shape, and at full size one prefill's outputs are ~240 MB. An evicted
    buffer still held by a caller stays alive until the caller lets go of it."""

    def __init__(self, max_shapes: int = 4, empty: Callable[[tuple[int, ...], str], Any] = np.empty):
        """empty(shape, dtype string): the allocator (numpy by default; torch tensors for run_tensors)."""
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


def make_backend(name: str, model_dir: str | Path, artifacts: str | Path | None, cfg: JanusFlowConfig,
                 threads: int | None = None, need_vae: bool = False, vae_dir: str | Path | None = None,
                 precision: str = "fp32"):
    from janusflow_trt.export.specs import PRECISIONS

    if precision not in PRECISIONS:
        raise JanusFlowError(f"unknown precision {precision!r}; choose from {','.join(PRECISIONS)}")
    if precision != "fp32" and name not in ("ort", "trt"):
        raise JanusFlowError(f"--precision {precision} needs --backend ort (exported variants); {name} runs FP32")
    if name == "torch-cuda":
        from janusflow_trt.janusflow_ref.vae import resolve_vae_dir

        from .torch_cuda import TorchCudaBackend

        return TorchCudaBackend(model_dir, resolve_vae_dir(model_dir, vae_dir) if need_vae else None)
    if name == "torch-fast":
        from janusflow_trt.janusflow_ref.vae import load_vae, resolve_vae_dir
        from janusflow_trt.janusflow_ref.weights import load_model

        vae = load_vae(resolve_vae_dir(model_dir, vae_dir)) if need_vae else None
        return TorchBackend(load_model(model_dir), vae, threads)
    if artifacts is None:
        raise JanusFlowError(f"--backend {name} needs --artifacts DIR (an export directory)")
    if name == "ort":
        return OrtBackend(artifacts, cfg, threads, precision=precision)
    if name == "trt":
        from .trt_backend import TrtBackend

        return TrtBackend(artifacts, cfg)
    raise JanusFlowError(f"unknown backend {name!r}")
