"""`janusflow triton-repo`, `triton-env`, `triton-server`: registered into the main CLI."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from janusflow_trt.errors import InputError
from janusflow_trt.runtime.argtypes import finite, int_range

from . import VARIANTS

DEFAULT_ENV = ".venv-triton"


def register(sub) -> None:
    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository from an export")
    p.add_argument("--model", required=True, help="checkpoint directory (config, tokenizer, processor files)")
    p.add_argument("--artifacts", required=True, help="export directory (onnx, python-ort) or engines from "
                   "`janusflow build` (trt)")
    p.add_argument("--out", required=True, help="the repository directory to write")
    p.add_argument("--backend", default="onnx", help=f"{' | '.join(VARIANTS)}: onnxruntime_onnx models, "
                   "tensorrt_plan models, or Python-backend models running ONNX Runtime on the CPU (the bundled "
                   "server of nvidia-pytriton)")
    p.add_argument("--precision", default="fp32", help="the exported variant the graph models serve")
    p.add_argument("--instances", type=finite(int), default=1, help="instances per model (instance_group count)")
    p.add_argument("--threads", type=finite(int), default=1,
                   help="python-ort: ONNX Runtime intra-op threads per graph model instance")
    p.add_argument("--force", action="store_true", help="replace OUT if it is a repository this command wrote")
    p.set_defaults(func=cmd_triton_repo)

    p = sub.add_parser("triton-env", help="make the environment the bundled Triton server of nvidia-pytriton "
                       "runs in (a venv: numpy<2, the wheel, this environment's packages)")
    p.add_argument("--env", default=DEFAULT_ENV, help=f"venv directory (default {DEFAULT_ENV})")
    p.set_defaults(func=cmd_triton_env)

    p = sub.add_parser("triton-server", help="run the bundled Triton server on a repository (python-ort variant)")
    p.add_argument("--repo", required=True, help="a repository from `janusflow triton-repo --backend python-ort`")
    p.add_argument("--env", default=DEFAULT_ENV, help=f"the environment from `janusflow triton-env` "
                   f"(default {DEFAULT_ENV})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--http-port", type=int_range(0, 65535), default=8000)
    p.add_argument("--grpc-port", type=int_range(0, 65535), default=8001)
    p.add_argument("--metrics-port", type=int_range(0, 65535), default=8002)
    p.set_defaults(func=cmd_triton_server)


def cmd_triton_repo(args: argparse.Namespace) -> int:
    from .repo import write_repo

    out = write_repo(args.model, args.artifacts, args.out, args.backend, args.precision, args.instances,
                     args.threads, args.force)
    print(f"wrote Triton repository ({args.backend}, {args.precision}) to {out}")
    return 0


def cmd_triton_env(args: argparse.Namespace) -> int:
    from .server import timed_build

    env, seconds = timed_build(args.env)
    print(f"Triton environment ready at {env.root} ({seconds:.1f} s)")
    return 0


def cmd_triton_server(args: argparse.Namespace) -> int:
    from .marker import repo_variant
    from .server import Env, server_command

    variant = repo_variant(Path(args.repo))
    if variant != "python-ort":
        raise InputError(f"--repo {args.repo} is the {variant} variant: the bundled server has only the Python "
                         "backend (write one with --backend python-ort)")
    argv, environ = server_command(Env(Path(args.env).absolute()), args.repo, args.http_port, args.grpc_port,
                                   args.metrics_port, args.host)
    os.execve(argv[0], argv, environ)  # the server takes this process over: signals reach it directly
    return 0  # not reached


def client(kind: str):
    """The --triton path of `janusflow chat|generate` (kind), or one line if tritonclient is missing."""
    try:
        from . import client as c
    except ImportError as e:
        raise InputError(f"--triton needs the triton extra ({e.name} is missing): "
                         "pip install 'janusflow-trt[triton]'") from None
    return {"chat": c.cli_chat, "generate": c.cli_generate}[kind]
