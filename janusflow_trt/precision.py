"""The precisions the project runs: one enum that the CLI, the API, the manifest, the specs
(export/specs.py: precision_variant) and the runtime read. Plain data, importable without torch.

Most are exported graph variants (EXPORTED: ONNX files beside the FP32 graphs). BF16 is not: it is
the torch backends' own dtype for the graph modules (the checkpoint's published precision), run from
the checkpoint's weights; runtime/registry.py says which backend runs which precision."""

from enum import StrEnum


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # Q/DQ for TensorRT: FP16 float parts, per-tensor activations
    INT8_CPU = "int8-cpu"  # Q/DQ for ONNX Runtime's CPU kernels: FP32 float parts
    BF16 = "bf16"  # torch backends only (torch-fast on a CPU with BF16 instructions, torch-cuda): not exported


# the variants `janusflow export` writes and an export directory's manifest can hold
EXPORTED: tuple[Precision, ...] = (Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT8_CPU)
