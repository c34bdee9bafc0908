"""`janusflow` command line: make-tiny, export, verify, chat, generate, bench.

User errors (JanusFlowError) print one line to stderr and exit 2; nothing else is caught, so an
internal bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from janusflow_ref.errors import InputError, JanusFlowError

BACKENDS = ("torch", "torch-fast", "ort", "trt")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints usage too; keep it to one line
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _finite(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {s!r}") from None
        if kind is float and not (v == v and abs(v) != float("inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {s}")
        return v
    parse.__name__ = kind.__name__
    return parse


def _seed(s: str) -> int:
    v = _finite(int)(s)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2^63), got {s}")
    return v


def _common_model_args(p: argparse.ArgumentParser, vae: bool = False) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (official JanusFlow layout)")
    if vae:
        p.add_argument("--vae", default=None, help="SDXL-VAE directory in diffusers layout (default MODEL/vae)")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch: official-style eager reference; torch-fast: our runtime on eager torch modules; "
                        "ort: ONNX Runtime over --artifacts; trt: TensorRT engines (GPU)")
    p.add_argument("--artifacts", default=None, help="export directory with manifest.json (ort/trt backends)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--precision", default="fp32",
                   help="fp32 | fp16 | int8 | int8-cpu: which exported variant --backend ort runs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def cmd_make_tiny(args) -> int:
    from janusflow_ref.tiny import make_tiny

    out = make_tiny(args.dir, size=args.size, seed=args.seed, force=args.force)
    print(f"wrote {args.size} checkpoint to {out}")
    return 0


def _check_precision(args) -> None:
    from export.variants import parse_precisions

    if args.precision not in parse_precisions(args.precision):  # unknown names raise in parse_precisions
        raise InputError(f"--precision takes one precision, got {args.precision!r}")
    if args.precision != "fp32" and args.backend not in ("ort", "trt"):
        raise InputError(f"--precision {args.precision} runs exported graphs: use --backend ort")


def cmd_chat(args) -> int:
    from janusflow_ref.config import load_config
    from janusflow_ref.processor import Processor, load_image
    from janusflow_ref.sampling import SamplingParams

    from .app import chat_session

    _check_precision(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    cfg = load_config(args.model)
    processor = Processor(args.model)
    image = load_image(args.image)
    if not args.question.strip():
        raise InputError("--question is empty")
    stream = None if args.json else _TextStream(processor.decode)
    res = chat_session(args, cfg, processor, image, params, on_token=stream.put if stream else None)
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "prompt_tokens": res.prompt_tokens,
                          "backend": args.backend, "seed": args.seed, "timings": res.timings}))
    else:
        stream.end(res.text)
    return 0


class _TextStream:
    """Prints the decoded answer as tokens arrive (re-decoding the tail keeps multi-byte text intact)."""

    def __init__(self, decode):
        self.ids: list[int] = []
        self.shown = ""
        self.decode = decode

    def put(self, tok: int) -> None:
        self.ids.append(tok)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text

    def end(self, final: str) -> None:
        sys.stdout.write(final[len(self.shown):] + "\n")
        sys.stdout.flush()


def cmd_generate(args) -> int:
    import numpy as np

    from janusflow_ref.generation import check_generation_args

    from .app import generate_session

    _check_precision(args)
    check_generation_args(args.steps, args.cfg, args.num_images)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise InputError(f"output directory does not exist: {out.parent}")
    init = None
    if args.init_latents:
        try:
            init = np.load(args.init_latents, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read --init-latents {args.init_latents}: {str(e).splitlines()[0]}") from None
    t0 = time.perf_counter()
    res = generate_session(args, init, progress=not args.json)
    if args.json:
        print(json.dumps({"images": [str(p) for p in res.paths], "seed": args.seed, "backend": args.backend,
                          "latents": args.save_latents, "timings": res.timings}))
    else:
        for p in res.paths:
            print(f"wrote {p}")
        print(f"done in {time.perf_counter() - t0:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="janusflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("make-tiny", help="write a random checkpoint in the official layout")
    p.add_argument("dir")
    p.add_argument("--size", choices=("tiny", "small", "full"), default="tiny")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
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
    p.add_argument("--init-latents", default=None, help=".npy [n,4,48,48] float32 initial noise")
    p.add_argument("--save-latents", default=None, help="write the final latents to this .npy")
    p.add_argument("--out", required=True, help="OUT.png (OUT_i.png for several images)")
    p.set_defaults(func=cmd_generate)

    for mod in ("export.commands", "benchmarks.commands"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except JanusFlowError as e:
        sys.stderr.write(f"janusflow {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
