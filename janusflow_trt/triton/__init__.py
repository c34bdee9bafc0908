"""Triton Inference Server: a model repository generated from our artifacts (`janusflow triton-repo`), the
Python-backend models that run the pipeline's own loops over BLS calls, the bundled server of the
nvidia-pytriton wheel (`janusflow triton-env`, `triton-server`) and a client (`chat|generate --triton`).
See docs/triton.md."""

VARIANTS = ("onnx", "trt", "python-ort")  # what runs the graph models: onnxruntime_onnx, tensorrt_plan, Python + ORT
