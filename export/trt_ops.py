"""The TensorRT ONNX parser's operator support, read from onnx-tensorrt's own docs/operators.md (kept
verbatim in export/data, with the repository commit it came from in its first line).

Parsed rather than retyped so that updating the list is one file copy: the parser keeps the
"Supported = Y" rows of the operator table and the opset range stated above it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import onnx

from janusflow_trt.errors import JanusFlowError

OPERATORS_MD = Path(__file__).parent / "data" / "onnx_tensorrt_operators.md"


@dataclass(frozen=True)
class OperatorDoc:
    source: str  # the URL (with commit) from the file's first line
    tensorrt: str  # "10.0": the version the doc names
    opset_min: int
    opset_max: int
    supported: frozenset[str]
    unsupported: frozenset[str]


def parse_operators_md(text: str) -> OperatorDoc:
    """Table rows `| Op | Y/N | types | restrictions |`; header row and separator skipped."""
    src = re.search(r"Source: (\S+)", text)
    rng = re.search(r"TensorRT ([\d.]+) supports operators in the inclusive range of opset (\d+) to opset (\d+)", text)
    if src is None or rng is None:
        raise ValueError("not onnx-tensorrt's operators.md (no source line or opset range)")
    yes: set[str] = set()
    no: set[str] = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[1] in ("Y", "N") and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", cells[0]):
            (yes if cells[1] == "Y" else no).add(cells[0])
    if not yes:
        raise ValueError("no operator rows found")
    return OperatorDoc(src.group(1), rng.group(1), int(rng.group(2)), int(rng.group(3)), frozenset(yes),
                       frozenset(no))


@cache
def operator_doc() -> OperatorDoc:
    return parse_operators_md(OPERATORS_MD.read_text())


def graph_ops(model: onnx.ModelProto) -> list[str]:
    """Op types of the main graph; other domains as `domain::Op` (never in TensorRT's ai.onnx table)."""
    return sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                   for n in model.graph.node})


def unsupported_ops(model: onnx.ModelProto, doc: OperatorDoc | None = None) -> list[str]:
    doc = doc or operator_doc()
    return [o for o in graph_ops(model) if o not in doc.supported]


def check_opset(model: onnx.ModelProto, name: str, doc: OperatorDoc | None = None) -> int:
    doc = doc or operator_doc()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not doc.opset_min <= opset <= doc.opset_max:
        raise JanusFlowError(f"graph {name}: opset {opset} is outside TensorRT {doc.tensorrt}'s parser range "
                             f"{doc.opset_min}..{doc.opset_max} ({OPERATORS_MD.name})")
    return opset
