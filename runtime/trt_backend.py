"""The TensorRT slot of the backend seam. Engine building, persistent device buffers and CUDA-graph
replay belong to the TensorRT issue; until then this backend says so in one line.

GPU-only code stays in this file so a CPU machine never imports tensorrt.
"""

from __future__ import annotations

from pathlib import Path

from janusflow_ref.config import JanusFlowConfig
from janusflow_ref.errors import JanusFlowError


def require_tensorrt():
    try:
        import tensorrt

        if not hasattr(tensorrt, "Builder"):  # tensorrt-stubs alone installs an empty namespace package
            raise ImportError("tensorrt stubs only")
    except ImportError:
        raise JanusFlowError("--backend trt needs an NVIDIA GPU with the tensorrt package (pip install "
                             "'janusflow-trt[tensorrt]'); use --backend ort here") from None
    return tensorrt


class TrtBackend:
    name = "trt"

    def __init__(self, artifacts: str | Path, cfg: JanusFlowConfig):
        require_tensorrt()
        raise JanusFlowError("--backend trt: engine building and execution are not implemented yet "
                             "(tracked by the TensorRT issue); use --backend ort")

    def run(self, graph: str, feeds: dict) -> dict:  # pragma: no cover - unreachable until implemented
        raise NotImplementedError
