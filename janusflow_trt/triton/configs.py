"""config.pbtxt of each model, written from the graph specs (export/specs.py): names, data types, dims
(-1 for a symbolic axis), the batch axis, instance groups and warm-up. No number is typed here twice.

Triton batching (max_batch_size > 0, dynamic batching) only where a graph's batch axis allows it: every
input and output leads with the same batch symbol, of minimum 1 and no multiple-of constraint (rows
independent). gen_enc (rows come in CFG pairs) and gen_dec (CFG mixes the cond and uncond halves; cfg_weight
and dt have no batch axis) are run with max_batch_size 0: the caller sends whole [cond, uncond] batches.
"""

from __future__ import annotations

from janusflow_trt.export.specs import GraphSpec, TensorSpec

from . import VARIANTS

DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "uint8": "TYPE_UINT8", "bytes": "TYPE_STRING"}
# what runs a graph model, per repository variant: (config line, instance kind)
GRAPH_RUNNERS = {"onnx": ('platform: "onnxruntime_onnx"', "KIND_AUTO"),
                 "trt": ('platform: "tensorrt_plan"', "KIND_GPU"),
                 "python-ort": ('backend: "python"', "KIND_CPU")}
assert tuple(GRAPH_RUNNERS) == VARIANTS
PREFIX = "janusflow_"


def model_name(graph: str) -> str:
    """The Triton model that serves `graph` (the BLS backend calls it by this name)."""
    return PREFIX + graph


def batch_axis(spec: GraphSpec) -> bool:
    """Whether Triton may batch requests of this graph along its first axis (see the module docstring)."""
    b = spec.syms.get("B")
    if b is None or b.min != 1 or b.multiple_of != 1:
        return False
    return all(t.shape and t.shape[0] == "B" for t in spec.inputs + spec.outputs)


def dims(spec: GraphSpec, t: TensorSpec, batched: bool) -> list[int]:
    return [-1 if isinstance(d, str) else d for d in t.shape[1 if batched else 0:]]


def _tensor(spec: GraphSpec, t: TensorSpec, batched: bool, optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return (f'  {{ name: "{t.name}" data_type: {DTYPES[t.dtype]} '
            f'dims: [ {", ".join(map(str, dims(spec, t, batched)))} ]{opt} }}')


def _warmup(spec: GraphSpec, batched: bool) -> str:
    """One warm-up request of zeros at the spec's smallest sizes (loads the session, touches the weights)."""
    ins = []
    for t in spec.inputs:
        shape = spec.shape(t, "min")[1 if batched else 0:]
        ins.append(f'    inputs {{ key: "{t.name}" value: {{ data_type: {DTYPES[t.dtype]} '
                   f'dims: [ {", ".join(map(str, shape))} ] zero_data: true }} }}')
    batch = "batch_size: 1\n" if batched else ""
    return "model_warmup [\n  {\n    name: \"zeros_min_shapes\"\n    " + batch + "\n".join(ins) + "\n  }\n]\n"


def graph_config(spec: GraphSpec, variant: str, instances: int, parameters: dict[str, str] | None = None) -> str:
    """config.pbtxt of the model serving one graph (spec: at the repository's precision)."""
    runner, kind = GRAPH_RUNNERS[variant]
    batched = batch_axis(spec)
    lines = [f'name: "{model_name(spec.name)}"', runner,
             f"max_batch_size: {spec.syms['B'].max if batched else 0}",
             "input [\n" + ",\n".join(_tensor(spec, t, batched) for t in spec.inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor(spec, t, batched) for t in spec.outputs) + "\n]"]
    if batched:
        lines.append("dynamic_batching { }")
    lines.append(f"instance_group [ {{ count: {instances} kind: {kind} }} ]")
    lines += _parameters(parameters or {})
    return "\n".join(lines) + "\n" + _warmup(spec, batched)


def _parameters(params: dict[str, str]) -> list[str]:
    return [f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()]


def python_config(name: str, inputs: list[tuple[str, str, list[int], bool]], outputs: list[tuple[str, str, list[int]]],
                  instances: int, decoupled: bool, parameters: dict[str, str]) -> str:
    """config.pbtxt of a Python-backend loop model (janusflow_chat, janusflow_t2i): whole requests
    (max_batch_size 0). inputs: (name, dtype, dims, optional); outputs: (name, dtype, dims)."""
    def one(n: str, dt: str, d: list[int], optional: bool = False) -> str:
        return (f'  {{ name: "{n}" data_type: {DTYPES[dt]} dims: [ {", ".join(map(str, d))} ]'
                f'{" optional: true" if optional else ""} }}')

    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
             "input [\n" + ",\n".join(one(*i) for i in inputs) + "\n]",
             "output [\n" + ",\n".join(one(*o) for o in outputs) + "\n]"]
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    lines.append(f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]")
    lines += _parameters(parameters)
    return "\n".join(lines) + "\n"
