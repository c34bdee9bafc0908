"""`janusflow` command line: make-tiny, export, verify, chat, generate, bench.

User errors (JanusFlowError) print one line to stderr and exit 2; nothing else is caught, so an
internal bug still shows its traceback. Ctrl-C, SIGTERM and SIGHUP print one line and exit 128 + the
signal (130, 143, 129) after the same cleanup: temporaries removed, old outputs kept.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time

from janusflow_trt.errors import InputError, JanusFlowError, Terminated
from janusflow_trt.runtime.argtypes import finite, seed, threads
from janusflow_trt.runtime.registry import BACKENDS, check_request


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints usage too; keep it to one line
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


_finite, _seed = finite, seed  # names the subcommand modules used before argtypes.py


def _common_model_args(p: argparse.ArgumentParser, vae: bool = False) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (official JanusFlow layout); required "
                   "unless --triton")
    p.add_argument("--triton", default=None, metavar="URL", help="ask a Triton server instead (grpc://HOST:PORT or "
                   "http://HOST:PORT; a repository from `janusflow triton-repo`): docs/triton.md")
    if vae:
        p.add_argument("--vae", default=None, help="SDXL-VAE directory in diffusers layout (default MODEL/vae)")
    p.add_argument("--backend", choices=tuple(BACKENDS), default="torch",
                   help="; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()))
    p.add_argument("--artifacts", default=None, help="export directory with manifest.json (ort/trt backends)")
    p.add_argument("--threads", type=threads, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--precision", default="fp32",
                   help="fp32 | fp16 | int8 | int8-cpu: the exported variant (ort, trt); "
                        "fp32 | bf16: the graph modules' dtype (torch-fast, torch-cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def cmd_make_tiny(args) -> int:
    from janusflow_trt.tiny import make_tiny

    out = make_tiny(args.dir, size=args.size, seed=args.seed, force=args.force, init=args.init)
    print(f"wrote {args.size} checkpoint ({args.init} init) to {out}")
    return 0


def _check_precision(args) -> None:
    """The backend / precision / artifacts combination, before anything is loaded (the API's own check)."""
    if args.model is None:
        raise InputError("--model is required (or --triton URL)")
    check_request(args.backend, args.precision, args.artifacts)


def cmd_chat(args) -> int:
    from janusflow_trt import Pipeline
    from janusflow_trt.janusflow_ref.processor import load_image
    from janusflow_trt.janusflow_ref.sampling import SamplingParams

    if args.triton:
        from janusflow_trt.triton.commands import client

        return client("chat")(args)
    _check_precision(args)
    SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)  # fail fast
    image = load_image(args.image)
    if not args.question.strip():
        raise InputError("--question is empty")
    pipe = Pipeline.from_pretrained(args.model, backend=args.backend, artifacts=args.artifacts, threads=args.threads,
                                    precision=args.precision)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.json:
        res = pipe.chat(image, args.question, **kw)
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "prompt_tokens": res.prompt_tokens,
                          "backend": args.backend, "seed": args.seed, "timings": res.timings}))
        return 0
    for piece in pipe.chat_stream(image, args.question, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def check_generate_outputs(out: str, num_images: int, save_latents: str | None, force: bool) -> None:
    """Every output location is checked before the run (the run writes them all at the end)."""
    from janusflow_trt.files import check_output_file
    from janusflow_trt.images import IMAGE_FORMATS, output_paths

    paths = [check_output_file(p, "--out", force, tuple(IMAGE_FORMATS)) for p in output_paths(out, num_images)]
    if save_latents:
        lat = check_output_file(save_latents, "--save-latents", force, (".npy",))
        if lat.resolve() in {p.resolve() for p in paths}:
            raise InputError(f"--save-latents {lat} is also an image output")


def cmd_generate(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from janusflow_trt import Pipeline
    from janusflow_trt.images import output_paths, save_images
    from janusflow_trt.latents_io import load_latents, npy_writer

    if not args.triton:
        _check_precision(args)
    check_generate_outputs(args.out, args.num_images, args.save_latents, args.force)
    init = load_latents(args.init_latents) if args.init_latents else None
    if args.triton:  # the run on a Triton server (a repository from `janusflow triton-repo`)
        from janusflow_trt.triton.commands import client

        return client("generate")(args, init)
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model, backend=args.backend, artifacts=args.artifacts, vae=args.vae,
                                    threads=args.threads, precision=args.precision)
    bar: list[tqdm] = []  # opened at the first step, so refused input prints its one line and no bar

    def progress(step: int, z) -> None:
        if not bar:  # disable=None: off when stderr is not a terminal (logs, pipes)
            bar.append(tqdm(total=args.steps, desc="euler", unit="step", disable=True if args.json else None))
        bar[0].update(1)

    try:
        res = pipe.generate(args.prompt, num_images=args.num_images, steps=args.steps, cfg_weight=args.cfg,
                            seed=args.seed, init_latents=init, callback=progress)
    finally:
        for b in bar:
            b.close()
    # every output was checked before the run; they are written to temporaries and renamed together
    extra = [(args.save_latents, npy_writer(res.latents))] if args.save_latents else []
    images = np.stack([np.asarray(im) for im in res.images])
    paths = save_images(images, output_paths(args.out, len(images)), extra=extra)[:len(images)]
    if args.json:
        print(json.dumps({"images": [str(p) for p in paths], "seed": args.seed, "backend": args.backend,
                          "latents": args.save_latents, "timings": res.timings}))
    else:
        for p in paths:
            print(f"wrote {p}")
        print(f"done in {time.perf_counter() - t0:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="janusflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("make-tiny", help="write a random checkpoint in the official layout")
    p.add_argument("dir")
    p.add_argument("--size", choices=("tiny", "small", "full", "golden", "tiny-gqa"), default="tiny")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--init", choices=("default", "peaked"), default="default",
                   help="weight distribution: default (1/sqrt(fan_in)) or peaked (issue 24: N(0,1) embedding, "
                        "N(0,0.04) q/k, N(0,0.1) LM head, N(0,0.02) other matrices, U(0.5,1.5) norms)")
    p.add_argument("--force", action="store_true", help="replace DIR if it is a checkpoint make-tiny wrote")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("chat", help="answer a question about an image")
    _common_model_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=_finite(int), default=512)
    p.add_argument("--temperature", type=_finite(float), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=_finite(float), default=1.0)
    p.add_argument("--seed", type=_seed, default=42)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="text-to-image")
    _common_model_args(p, vae=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=_finite(int), default=30)
    p.add_argument("--cfg", type=_finite(float), default=2.0, help="CFG weight (official demo default 2)")
    p.add_argument("--num-images", type=_finite(int), default=1)
    p.add_argument("--seed", type=_seed, default=12345)
    p.add_argument("--init-latents", default=None, help=".npy [n,4,48,48] floating-point initial noise")
    p.add_argument("--save-latents", default=None, help="write the final latents to this .npy")
    p.add_argument("--out", required=True, help="OUT.png (OUT_i.png for several images); the suffix picks the "
                   "format: .png .jpg .jpeg .webp .bmp .tif .tiff")
    p.add_argument("--force", action="store_true", help="replace existing --out / --save-latents files")
    p.set_defaults(func=cmd_generate)

    # the CLI sits above every layer: it registers the subcommands each layer owns
    from janusflow_trt import export_commands
    from janusflow_trt.benchmarks import commands as bench_commands
    from janusflow_trt.runtime import gpu_check
    from janusflow_trt.serve import commands as serve_commands
    from janusflow_trt.triton import commands as triton_commands

    for module in (export_commands, bench_commands, gpu_check, serve_commands, triton_commands):
        module.register(sub)
    return parser


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop(signum, frame) -> None:
    for s in STOP_SIGNALS:  # once: a second signal must not break the cleanup the first one started
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def _redeliver(hook):
    """sys.unraisablehook: a Terminated raised while the main thread ran a callback whose exceptions Python
    ignores (a weakref callback, __del__: seen inside the import lock's) is lost; deliver the signal again,
    from a thread a moment later, so that its handler raises in ordinary code."""
    def h(u) -> None:
        if isinstance(u.exc_value, Terminated):
            signal.signal(u.exc_value.signum, _stop)
            threading.Timer(0.05, os.kill, (os.getpid(), u.exc_value.signum)).start()
            return
        hook(u)
    return h


@contextlib.contextmanager
def _stop_signals_raise():
    """SIGTERM / SIGHUP raise Terminated (a KeyboardInterrupt) in the main thread while a command runs."""
    try:
        old = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread (main() called from a thread): leave the handlers alone
        yield
        return
    hook, sys.unraisablehook = sys.unraisablehook, _redeliver(sys.unraisablehook)
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    clear = "\r\033[K" if sys.stderr.isatty() else ""  # a progress bar may hold the terminal's line
    try:
        with _stop_signals_raise():
            return int(args.func(args) or 0)
    except JanusFlowError as e:
        sys.stderr.write(f"{clear}janusflow {args.command}: error: {e}\n")
        return 2
    except Terminated as e:
        sys.stderr.write(f"{clear}janusflow {args.command}: terminated by {signal.Signals(e.signum).name}; "
                         "outputs left as they were\n")
        return 128 + e.signum
    except KeyboardInterrupt:
        sys.stderr.write(f"{clear}interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
