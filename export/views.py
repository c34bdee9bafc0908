"""Views (export/specs.py VIEWS): a graph file cut down to the outputs a caller reads.

`llm_gen` is the LLM graph without the LM head and without the K/V outputs: what an Euler step reads.
It is derived from the llm file already on disk (every precision variant of it), by onnx.utils'
Extractor: the nodes that reach the kept outputs, and the initializers those nodes use. The graph is
loaded without its external data, so the kept initializers keep their (location, offset, length)
references into the PARENT's data file: the view file is only the graph (kilobytes), and no weight
is copied. A parent small enough to be stored inline gives an inline view (a copy of its kept weights).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx
import onnx.utils

from .manifest import file_record
from .specs import VIEWS, GraphSpec

log = logging.getLogger(__name__)


def view_file(parent_file: str, parent: str, view: str) -> str:
    """llm.onnx -> llm_gen.onnx, llm.fp16.onnx -> llm_gen.fp16.onnx."""
    assert parent_file.startswith(parent + "."), parent_file
    return view + parent_file[len(parent):]


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    # the Extractor follows node inputs only, not names a subgraph reads from the outer scope
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


def derive_view(src: Path, spec: GraphSpec, out: Path) -> dict[str, Any]:
    """src (a graph file, external data left on disk) -> out with only spec's outputs; -> manifest fields."""
    model = onnx.load(str(src), load_external_data=False)
    if _has_subgraphs(model):
        raise ValueError("graph has control-flow subgraphs")
    view = onnx.utils.Extractor(model).extract_model(spec.input_names, spec.output_names)
    # the Extractor keeps only the value_info of kept tensors; carry the parent's model metadata over
    view.ir_version, view.producer_name, view.producer_version = model.ir_version, model.producer_name, \
        model.producer_version
    onnx.save_model(view, str(out))  # tensors without raw_data keep their external-data references
    locations = sorted({kv.value for t in view.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                        for kv in t.external_data if kv.key == "location"})
    return {"outputs": spec.output_names, "nodes": len(view.graph.node), "parent_nodes": len(model.graph.node),
            "initializers": len(view.graph.initializer), "parent_initializers": len(model.graph.initializer),
            "data_files": locations}


def add_views(out_dir: Path, entries: dict[str, dict[str, Any]], specs: dict[str, GraphSpec]) -> None:
    """For every view whose parent graph was exported: derive it from the parent's file at every precision,
    recorded as entry["views"][view] beside that file's own record (fp32 entry and each precision entry).
    A parent the Extractor cannot cut (control flow) keeps no view: the runtime then runs the parent."""
    for view, (parent, _) in VIEWS.items():
        p = entries.get(parent)
        if p is None:
            continue
        for e in [p, *p.get("precisions", {}).values()]:
            name = view_file(e["file"], parent, view)
            try:
                info = derive_view(out_dir / e["file"], specs[view], out_dir / name)
            except (ValueError, onnx.checker.ValidationError) as err:
                log.warning("no %s view of %s (%s): the runtime will run %s", view, e["file"], err, parent)
                (out_dir / name).unlink(missing_ok=True)
                continue
            own = [e["external_data"]["file"]] if e.get("external_data") else []
            assert info["data_files"] == own, f"{name} reads {info['data_files']}, its parent {own}"
            v = {**file_record(out_dir, name), **info, "derived_from": e["file"]}
            if e.get("external_data"):  # the very record of the parent's data file: one file, two readers
                v["external_data"] = dict(e["external_data"])
            e.setdefault("views", {})[view] = v
