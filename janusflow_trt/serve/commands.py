"""`janusflow serve`: registered into the main CLI. The model is loaded once, before the port opens."""

from __future__ import annotations

import argparse

from janusflow_trt.runtime.argtypes import finite, int_range, threads
from janusflow_trt.runtime.registry import BACKENDS, check_request


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: /v1/chat/completions, /v1/images/generations")
    p.add_argument("--model", required=True, help="checkpoint directory (official JanusFlow layout)")
    p.add_argument("--vae", default=None, help="SDXL-VAE directory (torch backends; default MODEL/vae)")
    p.add_argument("--backend", choices=tuple(BACKENDS), default="ort",
                   help="; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()))
    p.add_argument("--artifacts", default=None, help="export directory with manifest.json (ort/trt backends)")
    p.add_argument("--precision", default="fp32", help="as for chat / generate")
    p.add_argument("--threads", type=threads, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_range(0, 65535), default=8000)
    p.add_argument("--max-batch", type=int_range(1, 1024), default=1,
                   help="chat answers decoded together, up to the llm graph's batch limit, and images sharing "
                        "each Euler step, up to the graphs' image limit (1: one request at a time)")
    p.add_argument("--image-step-images", type=int_range(1, 1024), default=None,
                   help="with --max-batch > 1: images per Euler step call (default: 1 on the CPU, where bigger "
                        "calls cost more per image; all that fit on a GPU); 1 time-slices the image requests "
                        "at step granularity (docs/serving.md)")
    p.add_argument("--max-queue", type=int_range(1, 100_000), default=64,
                   help="requests waiting beyond it are refused with 429 and Retry-After")
    p.add_argument("--request-timeout", type=finite(float), default=600.0, help="seconds per request")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model's "
                   "directory name)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    # the web stack and the model load only when the command runs (`janusflow --help` stays fast)
    from pathlib import Path

    from janusflow_trt import Pipeline
    from janusflow_trt.errors import InputError

    try:
        import uvicorn

        from .app import Settings, create_app
    except ImportError as e:
        raise InputError(f"janusflow serve needs the serve extra ({e.name} is missing): "
                         "pip install 'janusflow-trt[serve]'") from None

    check_request(args.backend, args.precision, args.artifacts)
    if args.request_timeout <= 0:
        raise InputError(f"--request-timeout must be > 0, got {args.request_timeout}")
    pipe = Pipeline.from_pretrained(args.model, backend=args.backend, artifacts=args.artifacts, vae=args.vae,
                                    precision=args.precision, threads=args.threads)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(pipe, Settings(model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                                    request_timeout_s=args.request_timeout, max_batch=args.max_batch,
                                    image_step_images=args.image_step_images))
    print(f"serving {name} ({args.backend}, {args.precision}) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
