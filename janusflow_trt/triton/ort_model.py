"""janusflow_<graph> of the python-ort variant: one ONNX graph on ONNX Runtime's CPU provider, for the
bundled server of nvidia-pytriton (no ONNX Runtime backend). Imports numpy and onnxruntime only, so each
graph model's stub process starts in about a second (the loop models load torch and the pipeline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnxruntime as ort


def parameter(config: dict, key: str, default: str | None = None) -> str:
    """A string parameter of a model's config.pbtxt (as the stub hands it over: JSON)."""
    v = config.get("parameters", {}).get(key, {}).get("string_value")
    if v is None:
        assert default is not None, f"config.pbtxt has no parameter {key!r}"
        return default
    return v


class OrtGraphModel:
    """janusflow_<graph> of the python-ort variant: the graph's ONNX file on ONNX Runtime's CPU provider,
    one request at a time (a dynamic batch is run request by request)."""

    pb: Any = None

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(parameter(config, "intra_op_threads", "1"))
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # many models share the cores
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list) -> list:
        pb, out = self.pb, []
        for r in requests:
            try:
                feeds = {n: pb.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs}
                res = self.session.run(self.outputs, feeds)
                out.append(pb.InferenceResponse(output_tensors=[pb.Tensor(n, a) for n, a in zip(self.outputs, res,
                                                                                                 strict=True)]))
            except Exception as e:  # onnxruntime's own error types: the message goes back to the caller
                out.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(
                    f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")))
        return out
