"""janusflow-trt: DeepSeek JanusFlow as ONNX graphs on ONNX Runtime and TensorRT.

    from janusflow_trt import Pipeline
"""

from .api import GenerateResult, Pipeline

__all__ = ["GenerateResult", "Pipeline"]
