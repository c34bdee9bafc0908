"""SmoothQuant-style scale migration for the LLM's INT8 variants (Xiao et al., 2023, "SmoothQuant").

A weight product y = x @ W is unchanged when x's channel j is divided by s_j and W's row j multiplied
by it. Where the op producing x can absorb the divisor exactly, the FP32 graph computes the same
numbers (to float rounding) while x's per-channel range moves towards W's, which per-tensor INT8
activations need more than per-channel INT8 weights do:

    s_j = max|x_j| ** alpha / max|W_j| ** (1 - alpha)

(max|x_j| over the calibration samples, max|W_j| over every product reading x), normalised to a
geometric mean of 1. Absorbers found in the exported LLM graph:
- RMSNorm's weight, the Mul by a 1-D initializer: q/k/v after input_layernorm, gate/up after
  post_attention_layernorm (the weight is divided by s);
- the gated MLP's up projection, Mul(silu(gate), up) feeding down_proj: up's output columns are
  divided by s (its per-output-channel INT8 scales follow them exactly).
Left alone: o_proj (its divisor would land in v_proj's output, i.e. in the K/V cache), the LM head
(its input is also the graph's last_hidden_state output).

Applied to the LLM before calibration (export/int8.py: derive_int8), for both INT8 flavours; the
recipe's `smoothquant` records alpha, the samples the ranges came from and each product's absorber.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from janusflow_trt.calibration.ranges import measure

from .onnx_graph import name_nodes, tensor_readers

ALPHA = 0.8  # measured best of 0.5 / 0.8 on the small and golden checkpoints (README: INT8)
GRAPHS = ("llm",)


@dataclass
class Group:
    """The weight products reading one activation, and what absorbs its divisor."""
    absorber: str  # "norm_weight" or "up_columns"
    absorber_init: str  # the initializer divided by s
    products: list[onnx.NodeProto] = field(default_factory=list)


def _weight(n: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """The [in, out] weight initializer of a plain MatMul x @ W, else None."""
    if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits and n.input[0] not in inits:
        return n.input[1] if len(inits[n.input[1]].dims) == 2 else None
    return None


def smoothing_groups(model: onnx.ModelProto) -> dict[str, Group]:
    """activation tensor -> Group, for every activation whose producer can absorb a per-channel divisor
    and whose every reader is a weight MatMul; each weight and absorber initializer read by one node only."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    readers = tensor_readers(g)
    uses = {t: len(rs) for t, rs in readers.items()}
    outputs = {o.name for o in g.output}
    groups: dict[str, Group] = {}
    for act, rs in readers.items():
        p = prod.get(act)
        if p is None or p.op_type != "Mul" or act in outputs or not rs:
            continue
        if not all((w := _weight(r, inits)) and uses.get(w) == 1 for r in rs):  # a shared weight: scaled twice
            continue
        vec = [i for i in p.input if i in inits and len(inits[i].dims) == 1]
        if vec and uses.get(vec[0]) == 1:
            groups[act] = Group("norm_weight", vec[0], list(rs))
            continue
        ups = [prod[i] for i in p.input if i in prod and _weight(prod[i], inits)]
        if len(ups) == 1 and len(readers.get(ups[0].output[0], [])) == 1:
            w = _weight(ups[0], inits)
            if w is not None and uses.get(w) == 1 and len(p.input) == 2:
                groups[act] = Group("up_columns", w, list(rs))
    return groups


def channel_absmax(path: str | Path, samples: Callable[[], Iterable[dict[str, np.ndarray]]],
                   names: list[str]) -> dict[str, np.ndarray]:
    """name -> max |x| per last-axis channel over every sample (float64), reduced inside the graph
    (calibration/ranges.py: measure, one run per sample; the FP16 range walk measures them alongside when
    an INT8 variant follows: export/variants.py)."""
    return measure(path, samples, channels=names, ranges=False).channels


def scales(x_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant's s_j = max|x_j|^alpha / max|W_j|^(1-alpha) (W [in, out]: row j), geometric mean 1."""
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
    s = np.maximum(x_absmax, 1e-5) ** alpha / np.maximum(w_absmax, 1e-5) ** (1 - alpha)
    s = s / np.exp(np.mean(np.log(s)))
    return np.clip(s, 1e-4, 1e4)


def migrations(model: onnx.ModelProto, amax: dict[str, np.ndarray], alpha: float,
               read: Callable[[str], np.ndarray]) -> tuple[list[tuple[str, np.ndarray]], dict[str, str]]:
    """The migration as (initializer, factor) steps in the order they apply (up's weight takes two: it is
    a gate/up product and down's absorber), and product node -> its absorber. read(name): an initializer's
    array; every s comes from the unmodified weights (only the products' weights are read)."""
    groups = {a: g for a, g in smoothing_groups(model).items() if a in amax}
    s = {a: scales(amax[a], [read(r.input[1]) for r in g.products], alpha) for a, g in groups.items()}
    steps: list[tuple[str, np.ndarray]] = []
    done: dict[str, str] = {}
    for a, g in groups.items():
        for r in g.products:
            steps.append((r.input[1], s[a][:, None]))
            done[r.name] = g.absorber
        steps.append((g.absorber_init, 1 / s[a] if g.absorber == "norm_weight" else 1 / s[a][None, :]))
    return steps, done


def scaled(w: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """One migration step on one weight (its dtype kept)."""
    return (w * factor).astype(w.dtype)


def smooth(model: onnx.ModelProto, amax: dict[str, np.ndarray], alpha: float) -> dict[str, str]:
    """Migrate in place; -> product node -> its absorber ('norm_weight' / 'up_columns')."""
    inits = {t.name: t for t in model.graph.initializer}
    steps, done = migrations(model, amax, alpha, lambda name: numpy_helper.to_array(inits[name]))
    for name, factor in steps:
        inits[name].CopyFrom(numpy_helper.from_array(scaled(numpy_helper.to_array(inits[name]), factor), name))
    return done


def load_smoothed(fp32_path: str | Path, amax: dict[str, np.ndarray],
                  alpha: float = ALPHA) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The graph file loaded, its nodes named and migrated by the channel maxima `amax` (channel_absmax of
    every activation smoothing_groups finds; export/int8.py: smoothing_maxima measures them on the graph
    read without its weights, before these are loaded); -> (model, the recipe's record: alpha and each
    product's absorber)."""
    model = onnx.load(str(fp32_path))
    name_nodes(model)  # the record names the products
    return model, {"alpha": alpha, "products": smooth(model, amax, alpha)}
