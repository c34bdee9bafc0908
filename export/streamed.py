"""Export without the weights in memory (the full-size LLM is 5.4 GB of FP32 weights; the inline export
held them about four times over: the module, the exporter's folded copies, the serialised proto).

- The graph module is built with FAKE parameters (torch's FakeTensorMode: shape and dtype, no storage)
  and traced by the same dynamo exporter; nothing is optimised yet, so no weight value is needed.
- Each parameter initializer then becomes an onnx_ir.LazyTensor that reads its one tensor from the
  checkpoint's safetensors when it is written (bf16 -> float32, as janusflow_ref.weights.load_model).
- The optimiser (the same onnxscript passes as `torch.onnx.export(optimize=True)`) would fold
  Transpose(W) of every linear weight into a new FP32 tensor held in memory; those folds are done first,
  lazily, under the name the optimiser gives them (the Transpose's output), with its own rule (a weight
  above its size limit, read by that Transpose only). Every smaller fold is left to the optimiser.
- onnx_ir writes the external-data file tensor by tensor, so at most one tensor (the 0.8 GB embedding
  or LM head) is in memory at a time.

The result equals the inline export: same initializers (names, dtypes, bytes), same nodes
(tests/test_streamed_export.py). The VAE (0.2 GB at full size, a diffusers module) is exported inline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from onnxscript.optimizer._constant_folding import DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT
from safetensors import SafetensorError, safe_open
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from janusflow_trt.errors import CheckpointError
from janusflow_trt.fingerprint import checkpoint_files
from janusflow_trt.janusflow_ref.config import JanusFlowConfig
from janusflow_trt.janusflow_ref.model import JanusFlow
from janusflow_trt.janusflow_ref.vae import FLOAT_DTYPES as SAFETENSORS_FLOATS
from janusflow_trt.janusflow_ref.weights import check_keys, expected_shapes, rebuild_buffers

STREAMED_GRAPHS = frozenset({"siglip", "embed", "llm", "gen_enc", "gen_dec"})  # the JanusFlow checkpoint's graphs


class CheckpointTensors:
    """The checkpoint's tensors by key, read one at a time. Opening checks what load_model checks
    (readable files, floating-point tensors, exactly the expected keys and shapes), with its messages."""

    def __init__(self, model_dir: Path, cfg: JanusFlowConfig):
        self.where: dict[str, Path] = {}
        shapes: dict[str, Any] = {}
        for f in checkpoint_files(Path(model_dir)):
            try:
                with safe_open(str(f), "pt") as h:
                    for k in h.keys():
                        s = h.get_slice(k)
                        if s.get_dtype() not in SAFETENSORS_FLOATS:  # as read_state_dict: name the torch dtype
                            dt = str(h.get_tensor(k).dtype).removeprefix("torch.")
                            raise CheckpointError(f"{f}: tensor {k} is {dt}; weights must be floating point "
                                                  f"(float32, float16, bfloat16)")
                        shapes[k] = torch.empty(s.get_shape(), device="meta")
                        self.where[k] = f
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{f}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})"
                                      ) from None
        check_keys(expected_shapes(cfg), shapes)

    def read(self, key: str, perm: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor as contiguous float32 (transposed by `perm` first if given)."""
        with safe_open(str(self.where[key]), "pt") as h:
            a = h.get_tensor(key).to(torch.float32).numpy()
        return np.ascontiguousarray(a.transpose(perm)) if perm is not None else a


def fake_model(cfg: JanusFlowConfig) -> tuple[JanusFlow, dict[int, str]]:
    """JanusFlow whose parameters are float32 fake tensors (no storage) and whose non-persistent buffers
    are real; -> (model, {id(parameter): checkpoint key})."""
    with torch.device("meta"):
        model = JanusFlow(cfg)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    keys: dict[int, str] = {}
    fakes: dict[int, nn.Parameter] = {}  # a parameter shared by two modules stays one parameter
    for prefix, mod in model.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in fakes:
                with mode:
                    fakes[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=torch.float32), requires_grad=False)
                keys[id(fakes[id(p)])] = f"{prefix}.{name}" if prefix else name
            setattr(mod, name, fakes[id(p)])
    rebuild_buffers(model, cfg)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    assert not left, f"buffers left on meta: {left[:3]}"
    return model.eval(), keys


def graph_keys(module: nn.Module, keys: dict[int, str]) -> dict[str, str]:
    """{parameter name in `module` (= the exported initializer's name): checkpoint key}."""
    return {n: keys[id(p)] for n, p in module.named_parameters(remove_duplicate=False) if id(p) in keys}


def _reader(ckpt: CheckpointTensors, key: str, perm: tuple[int, ...] | None = None) -> Callable[[], ir.Tensor]:
    return lambda: ir.Tensor(ckpt.read(key, perm))


def _fold_weight_transposes(graph: ir.Graph, sources: dict[str, str], ckpt: CheckpointTensors) -> int:
    """Transpose(W) -> a lazy initializer W^T named as the Transpose's output, where onnxscript's folder
    would fold it anyway (its _DEFAULT_ALWAYS_FOLD_OPS rule: W above the size limit, read by this node
    only); -> the number folded."""
    done = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        w = node.inputs[0]
        if w is None or w.name not in sources or not w.is_initializer() or len(w.uses()) != 1 \
                or w.const_value is None or w.const_value.size <= DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT:
            continue
        attr = node.attributes.get("perm")
        dims = w.shape
        assert dims is not None, w.name
        perm = tuple(attr.as_ints()) if attr is not None else tuple(reversed(range(len(dims))))
        out = node.outputs[0]
        name, key = out.name, sources[w.name]
        assert name is not None
        shape = ir.Shape([dims[i] for i in perm])
        lazy = ir.LazyTensor(_reader(ckpt, key, perm), dtype=ir.DataType.FLOAT, shape=shape, name=name)
        out.name = f"{name}__folded"
        folded = ir.Value(name=name, shape=shape, type=ir.TensorType(ir.DataType.FLOAT), const_value=lazy)
        out.replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        graph.register_initializer(folded)
        done += 1
    for name in [n for n, v in graph.initializers.items() if not v.uses() and n in sources]:
        del graph.initializers[name]  # the weights whose only reader was a folded Transpose
    return done


def attach_weights(model: ir.Model, sources: dict[str, str], ckpt: CheckpointTensors) -> int:
    """Replace every fake parameter initializer of `model` by a lazy read of its checkpoint tensor; -> the
    number of Transposes folded (see _fold_weight_transposes)."""
    folded = _fold_weight_transposes(model.graph, sources, ckpt)
    for name, v in model.graph.initializers.items():
        if name in sources:
            assert v.dtype == ir.DataType.FLOAT and v.shape is not None, f"{name}: {v.dtype} {v.shape}"
            v.const_value = ir.LazyTensor(_reader(ckpt, sources[name]), dtype=ir.DataType.FLOAT, shape=v.shape,
                                          name=name)
    return folded


def save_streamed(model: ir.Model, path: Path) -> str:
    """`model` to path, every tensor above 256 bytes into path.name + '.data', one tensor at a time (one
    worker: a parallel writer would hold several at once); -> the data file's name."""
    data = path.name + ".data"
    (path.parent / data).unlink(missing_ok=True)
    ir.save(model, str(path), external_data=data, max_workers=1)
    return data


class _ParameterReads(TorchFunctionMode):
    """Records every parameter passed to a torch function (a linear's weight, an indexed embedding)."""

    def __init__(self):
        super().__init__()
        self.seen: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen.update(id(a) for a in tree_leaves((args, kwargs)) if isinstance(a, nn.Parameter))
        return func(*args, **kwargs)


def used_keys(module: nn.Module, args: tuple, sources: dict[str, str]) -> dict[str, str]:
    """The part of `sources` (graph_keys) that module(*args) reads, found by one run on fake tensors (a
    graph module wraps the whole model: SigLIP's holds the LLM's weights too)."""
    mode = next(module.parameters()).fake_mode
    reads = _ParameterReads()
    with mode, torch.no_grad(), reads:
        module(*(mode.from_tensor(a) for a in args))
    return {n: sources[n] for n, p in module.named_parameters(remove_duplicate=False)
            if id(p) in reads.seen and n in sources}


def materialize(module: nn.Module, sources: dict[str, str], ckpt: CheckpointTensors) -> nn.Module:
    """`module` (from fake_model) with real float32 parameters for `sources` (used_keys: its own weights
    only): one graph's torch module without the rest of the model (a per-graph parity check: torch module
    + ORT session, then both released)."""
    for name, key in sources.items():
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        setattr(sub, attr, nn.Parameter(torch.from_numpy(ckpt.read(key)), requires_grad=False))
    return module
