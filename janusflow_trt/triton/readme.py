"""The README.md written inside a generated repository: how to serve it and how to call it."""

from __future__ import annotations

from pathlib import Path

RUNS = {
    "onnx": "the graph models are `onnxruntime_onnx` models: a Triton server with the ONNX Runtime and Python "
            "backends (the NGC `tritonserver` container) serves it; this variant has been generated and its "
            "configs checked against the ONNX graphs, not run by us (the bundled server of nvidia-pytriton has no "
            "ONNX Runtime backend)",
    "trt": "the graph models are `tensorrt_plan` models (engines from `janusflow build`): a Triton server with the "
           "TensorRT and Python backends, on the GPU the engines were built for (NGC `tritonserver` container); "
           "generated only, not run by us",
    "python-ort": "every model is a Python-backend model (the graphs run on ONNX Runtime's CPU provider): the "
                  "bundled server of the nvidia-pytriton wheel serves it on a CPU-only machine; this is the "
                  "variant our tests run (tests/test_triton.py)",
}


def repo_readme(variant: str, precision: str, graphs: list[str], out: Path) -> str:
    models = ", ".join(f"`janusflow_{g}`" for g in graphs)
    return f"""# JanusFlow on Triton Inference Server ({variant}, {precision})

Written by `janusflow triton-repo`. Models: {models} (one per graph), `janusflow_chat` (decoupled: streams
one response per token) and `janusflow_t2i`. The two loop models are Python-backend models that run the
janusflow-trt pipeline's own decode and Euler loops, with every graph call a BLS request to the graph's
model, so each graph scales (instance_group) and is placed on its own.

Variant `{variant}`: {RUNS[variant]}.

## Serve

The Python models import `janusflow_trt` (and torch, transformers, onnxruntime): the Python that Triton's
stub runs must have `pip install janusflow-trt` (numpy < 2 with nvidia-pytriton's bundled server).

    tritonserver --model-repository {out}

With the bundled server of nvidia-pytriton (an environment made by `janusflow triton-env`):

    janusflow triton-server --repo {out} --env .venv-triton --http-port 8000 --grpc-port 8001 --metrics-port 8002

## Call

    janusflow chat --triton grpc://127.0.0.1:8001 --image cat.png --question "What is in the picture?"
    janusflow generate --triton grpc://127.0.0.1:8001 --prompt "a red fox" --num-images 2 --out fox.png

or with tritonclient: `janusflow_chat` (gRPC stream: `start_stream` + `async_stream_infer`; HTTP: one
request, the responses gathered) takes `image` (BYTES [1]: the image file's bytes), `question` (BYTES [1]),
optional `max_new_tokens` (INT32), `temperature`, `top_p` (FP32), `seed` (INT64); each response holds
`token_ids` (INT64 [n]) and `text` (BYTES [1], the piece those tokens complete). `janusflow_t2i` takes
`prompt` (BYTES [1]), optional `num_images`, `steps` (INT32), `cfg_weight` (FP32), `seed` (INT64),
`init_latents` (FP32 [n, 4, 48, 48]) and returns `images` (UINT8 [n, H, W, 3]) and `latents`
(FP32 [n, 4, 48, 48]).

Metrics (per-model request counts and times): `curl 127.0.0.1:8002/metrics`.
"""
