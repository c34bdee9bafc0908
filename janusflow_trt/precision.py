"""The precisions a graph is exported at: one enum that the CLI, the API, the manifest, the specs
(export/specs.py: precision_variant) and the runtime read. Plain data, importable without torch."""

from enum import StrEnum


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # Q/DQ for TensorRT: FP16 float parts, per-tensor activations
    INT8_CPU = "int8-cpu"  # Q/DQ for ONNX Runtime's CPU kernels: FP32 float parts
