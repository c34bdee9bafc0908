"""ONNX graphs of JanusFlow: one spec per graph (specs.py), torch -> ONNX (torch_to_onnx.py), precision
variants (variants.py: fp16.py, int8.py), views, manifest, verification, TensorRT builds. The export
command that runs them in order, with calibration recording, is janusflow_trt/export_job.py."""
