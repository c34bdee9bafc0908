"""Reading an ONNX graph's wiring (plain onnx: no torch, no onnxruntime)."""

from __future__ import annotations

import onnx


def graph_opset(model: onnx.ModelProto) -> int:
    """The default (ai.onnx) domain's opset."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def tensor_readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """tensor name -> the nodes that read it, in graph order (a node reading it twice is listed twice)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return readers
