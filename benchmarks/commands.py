"""`janusflow bench`: registered into the main CLI."""

from __future__ import annotations

import os
from pathlib import Path

from janusflow_trt.errors import InputError
from janusflow_trt.runtime.argtypes import int_range, threads


def _ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x]
    except ValueError:
        raise InputError(f"--contexts: expected comma-separated integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise InputError(f"--contexts: expected positive integers, got {s!r}")
    return v


OUTPUTS = ("bench.json", "bench.md", "bench.png")
DECODE_MARGIN = 32  # decode tokens (<= 16) after a context, plus warm-up, must still fit the model's context


def check_out(out: Path, force: bool) -> None:
    """Before the run: OUT is a directory we may create or write bench.* into."""
    from janusflow_trt.files import check_output_dir

    check_output_dir(out, "--out", force, OUTPUTS)


def max_context(args) -> int:
    from janusflow_trt.janusflow_ref.config import load_config

    if args.model:
        return load_config(args.model).max_context
    from janusflow_trt.tiny import model_config

    return int(model_config(args.size, 0)["language_config"]["max_position_embeddings"])


def cmd_bench(args) -> int:
    # Busy-waiting OpenMP threads on a 2-core machine slow everything else down many-fold; set before
    # torch starts its thread pool (torch is imported lazily below) and report it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from janusflow_trt.runtime.backends import physical_cores

    from .bench import run_bench

    threads = args.threads or physical_cores()
    backends = [b for b in args.backends.split(",") if b]
    from janusflow_trt.export.variants import parse_precisions

    names = [p.strip() for p in args.precision.split(",") if p.strip()]
    bf16 = [f"{b}-bf16" for b in ("baseline", "torch-fast") if b in backends] if "bf16" in names else []
    args.precision = ",".join(p for p in names if p != "bf16") or "fp32"  # bf16 is no exported variant
    extra = [p for p in parse_precisions(args.precision) if p != "fp32"]
    if extra and "ort" not in backends:
        raise InputError(f"--precision {args.precision} is measured on the ort backend: include ort in --backends")
    if "bf16" in names:  # the torch backends' dtype: the baseline and torch-fast again in BF16
        from janusflow_trt.runtime.cpu_isa import require_bf16

        require_bf16()
        if not bf16:
            raise InputError("--precision bf16 is measured on baseline / torch-fast: include one in --backends")
    backends += [f"ort-{p}" for p in extra] + bf16  # exported variants side by side with FP32 ORT
    for b in backends:
        if b not in ("baseline", "torch-fast", "ort", *(f"ort-{p}" for p in ("fp16", "int8", "int8-cpu")),
                     "baseline-bf16", "torch-fast-bf16"):
            raise InputError(f"unknown backend {b!r} in --backends (baseline, torch-fast, ort)")
    contexts = _ints(args.contexts)
    limit = max_context(args) - DECODE_MARGIN
    if max(contexts) > limit:
        raise InputError(f"--contexts {max(contexts)} does not fit the model: at most {limit} (context "
                         f"{limit + DECODE_MARGIN} minus {DECODE_MARGIN} for the decoded tokens)")
    out = Path(args.out)
    check_out(out, args.force)
    from janusflow_trt.files import owned_tempdir

    with owned_tempdir("janusflow-bench") as work:  # the on-the-fly checkpoint and export; removed on every exit
        return _bench(args, threads, backends, contexts, out, work, run_bench)


def _bench(args, threads, backends, contexts, out, work, run_bench) -> int:
    model = Path(args.model) if args.model else None
    if model is None:
        from janusflow_trt.tiny import make_tiny

        print(f"making a {args.size} checkpoint ...")
        model = make_tiny(work / args.size, size=args.size, seed=0)
    artifacts = Path(args.artifacts) if args.artifacts else None
    if "ort" in backends and artifacts is None:
        from janusflow_trt.export_job import export_graphs

        print("exporting graphs for the ort backend ...")
        artifacts = work / "onnx"
        export_graphs(model, None, artifacts, precisions=args.precision)
    precisions = ["fp32" if b == "ort" else b.removeprefix("ort-") for b in backends if b.startswith("ort")]
    if artifacts is not None and precisions:  # every precision the run will time, checked before any is timed
        from janusflow_trt.janusflow_ref.config import load_config
        from janusflow_trt.runtime.backends import read_manifest_at

        read_manifest_at(artifacts, load_config(model), precisions)
    quick = args.quick
    res = run_bench(model, artifacts, out, backends, contexts, threads, repeat=1 if quick else args.repeat,
                    decode_tokens=4 if quick else 16, e2e_steps=args.steps, size=args.size if not args.model
                    else str(args.model))
    print((out / "bench.md").read_text())
    print(f"peak RSS {res['peak_rss_mb']:.0f} MB; wrote {out}/bench.json, bench.md, bench.png")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="per-stage latency, backends side by side, ratios vs the official-style baseline")
    p.add_argument("--model", default=None, help="checkpoint dir (default: make a --size checkpoint on the fly)")
    p.add_argument("--size", choices=("tiny", "small", "full"), default="small")
    p.add_argument("--artifacts", default=None, help="export dir for the ort backend (default: export on the fly)")
    p.add_argument("--backends", default="baseline,torch-fast,ort")
    p.add_argument("--contexts", default="64,256,1024", help="decode contexts")
    p.add_argument("--steps", type=int_range(1, 1000), default=30, help="Euler steps for the end-to-end s/image")
    p.add_argument("--repeat", type=int_range(1, 1000), default=5)
    p.add_argument("--threads", type=threads, default=None)
    p.add_argument("--precision", default="fp32",
                   help="fp32,fp16,int8,int8-cpu: also run the ort backend on those variants; bf16: also the "
                        "baseline and torch-fast in BF16")
    p.add_argument("--quick", action="store_true", help="one repeat, few decode tokens (demo/CI smoke)")
    p.add_argument("--out", default="bench_out", help="directory for bench.json, bench.md, bench.png")
    p.add_argument("--force", action="store_true", help="replace existing bench.* files in --out")
    p.set_defaults(func=cmd_bench)
    register_bench_serve(sub)


# -- bench-serve (issue 23): load on `janusflow serve`; the work is in serve_load.py ---------------------------
def _list(flag: str, s: str, kind, lo) -> tuple:
    try:
        v = tuple(kind(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated {kind.__name__}s, got {s!r}") from None
    if any(not (x >= lo) or x != x or x == float("inf") for x in v):  # also NaN / inf
        raise InputError(f"{flag}: every value must be finite and >= {lo}, got {s!r}")
    return v


def cmd_bench_serve(args) -> int:
    import asyncio
    import json
    import shlex
    import sys

    from janusflow_trt.files import check_output_dir, owned_tempdir, write_into

    try:
        from . import serve_load as sl
    except ImportError as e:  # the client side: openai, httpx (dev extra); the server: the serve extra
        raise InputError(f"janusflow bench-serve needs {e.name}: pip install 'janusflow-trt[serve,dev]'") from None

    workloads = tuple(dict.fromkeys(w.strip() for w in args.workloads.split(",") if w.strip()))
    if not workloads or any(w not in sl.WORKLOADS for w in workloads):
        raise InputError(f"--workloads: expected some of {', '.join(sl.WORKLOADS)}, got {args.workloads!r}")
    conc = _list("--concurrency", args.concurrency, int, 1)
    rates = _list("--rates", args.rates, float, 1e-6) if args.rates else ()
    if not conc and not rates:
        raise InputError("nothing to run: give --concurrency and/or --rates")
    if not args.duration > 0:
        raise InputError(f"--duration must be > 0 seconds, got {args.duration}")
    if args.url and (args.model or args.artifacts):
        raise InputError("--url targets a running server: drop --model / --artifacts")
    if bool(args.model) != bool(args.artifacts):
        raise InputError("--model and --artifacts go together (or neither: a --size checkpoint is made on the fly)")
    slo = sl.SLO(*_list("--slo", args.slo, float, 1e-6)) if args.slo else sl.SLO()
    if args.slo and len(args.slo.split(",")) != 3:
        raise InputError(f"--slo: expected TTFT_MS,TPOT_MS,IMAGE_MS, got {args.slo!r}")
    out = Path(args.out)
    name = args.name or ("serve_soak_small" if args.soak else "serve_small")
    names = [f"{name}.{x}" for x in (("json", "md") if args.soak else ("json", "md", "png"))]
    check_output_dir(out, "--out", args.force, names)
    plan = sl.Plan(workloads, conc, rates, args.requests, args.duration, args.warmup, args.max_tokens,
                   args.image_steps, args.image_every, slo)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def drive(url: str, proc) -> dict:
        if args.soak:
            return asyncio.run(sl.soak(url, proc, args.requests, args.soak_concurrency, args.soak_malformed,
                                       args.max_tokens, args.image_steps, args.image_every))
        return asyncio.run(sl.run_plan(url, plan, proc))

    with owned_tempdir("janusflow-bench-serve") as work:
        if args.url:
            url = sl.check_url(args.url)
            sl.wait_ready(url)
            res = drive(url, None)
            server, desc = f"{url} (--url)", f"server at {url}"
        else:
            model, artifacts = (Path(args.model), Path(args.artifacts)) if args.model else _made(args.size, work)
            desc = f"{args.model or args.size + ' preset'}, ORT FP32, --max-batch {args.max_batch}"
            with sl.started_server(model, artifacts, args.max_batch, work / "server.log", args.threads) as (url, p):
                res = drive(url, p)
            server = f"`janusflow serve --backend ort --max-batch {args.max_batch}` started by the command"
    argv = sys.argv[2:] if sys.argv[1:2] == ["bench-serve"] else []  # as typed, when run from the shell
    res["meta"] = {"command": shlex.join(["janusflow", "bench-serve", *argv]), "model_desc": desc, "server": server,
                   "machine": sl.machine(), "versions": {"openai": sl.openai.__version__},
                   "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "image_ms": slo.image_ms},
                   "max_tokens": args.max_tokens, "image_steps": args.image_steps, "image_every": args.image_every,
                   "requests": args.requests, "duration_s": args.duration, "warmup": args.warmup,
                   "concurrency": args.soak_concurrency if args.soak else None}
    if args.soak:
        written = write_into(out, [(f"{name}.json", lambda p: Path(p).write_text(json.dumps(res, indent=1) + "\n")),
                                   (f"{name}.md", lambda p: Path(p).write_text(sl.soak_markdown(res)))])
        print(sl.soak_markdown(res))
        print("wrote " + ", ".join(str(p) for p in written))
        failed_checks = [k for k, ok in res["checks"].items() if ok is False]
        if failed_checks:
            print(f"janusflow bench-serve: soak failed: {'; '.join(failed_checks)}", file=sys.stderr)
            return 1
        return 0
    res["meta"]["euler_note"] = None if any(r["first_euler_step_ms"] for r in res["runs"]) else \
        f"Time to first Euler step: TODO, the server exports no {sl.EULER_METRIC} histogram yet."
    res["targets"] = sl.targets(res["runs"])
    written = sl.write_results(res, out, name)
    print(sl.markdown(res))
    print("wrote " + ", ".join(str(p) for p in written))
    failed = sum(r["failed"] for r in res["runs"])
    if failed:  # the figures are written, but a failed or wrong answer is a failed benchmark
        print(f"janusflow bench-serve: {failed} request(s) failed or were wrong (see {written[0]}: errors)",
              file=sys.stderr)
        return 1
    return 0


def _made(size: str, work: Path) -> tuple[Path, Path]:
    from janusflow_trt.export_job import export_graphs
    from janusflow_trt.tiny import make_tiny

    print(f"making a {size} checkpoint and exporting it ...")
    model = make_tiny(work / size, size=size, seed=0)
    export_graphs(model, None, work / "onnx")
    return model, work / "onnx"


def register_bench_serve(sub) -> None:
    from janusflow_trt.runtime.argtypes import finite

    p = sub.add_parser("bench-serve", help="load benchmark of `janusflow serve` (openai async client): TTFT, ITL, "
                                           "tokens/s, images/min at several concurrencies and request rates")
    p.add_argument("--url", default=None, help="a running server (default: start `janusflow serve` on a free port)")
    p.add_argument("--model", default=None, help="checkpoint dir for the started server (with --artifacts)")
    p.add_argument("--artifacts", default=None, help="its ONNX export")
    p.add_argument("--size", choices=("tiny", "small"), default="small",
                   help="without --model: make and export this preset on the fly")
    p.add_argument("--max-batch", type=int_range(1, 1024), default=8, help="the started server's --max-batch")
    p.add_argument("--threads", type=threads, default=None, help="the started server's --threads")
    p.add_argument("--workloads", default="chat", help="comma-separated: chat, images, mixed")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="closed-loop levels (comma-separated; '' for none)")
    p.add_argument("--rates", default="", help="open-loop Poisson request rates per second (comma-separated)")
    p.add_argument("--requests", type=int_range(1, 1_000_000), default=48, help="requests per load level (at most)")
    p.add_argument("--duration", type=finite(float), default=90.0, help="seconds per load level (at most)")
    p.add_argument("--warmup", type=int_range(0, 1000), default=2, help="uncounted requests per workload")
    p.add_argument("--max-tokens", type=int_range(1, 4096), default=64, help="chat answer length (fixed)")
    p.add_argument("--image-steps", type=int_range(1, 1000), default=10, help="Euler steps per image")
    p.add_argument("--image-every", type=int_range(2, 1000), default=4, help="mixed: every Nth request an image")
    p.add_argument("--slo", default="", help="goodput SLO as TTFT_MS,TPOT_MS,IMAGE_MS (default 2000,100,30000)")
    p.add_argument("--out", default="docs/results", help="directory for NAME.json, NAME.md, NAME.png")
    p.add_argument("--name", default=None, help="file name stem of the results (default serve_small; with --soak "
                                                "serve_soak_small)")
    p.add_argument("--soak", action="store_true", help="instead of the load levels: --requests valid requests "
                   "(mixed) and --soak-malformed malformed ones at --soak-concurrency; every answer checked")
    p.add_argument("--soak-concurrency", type=int_range(1, 1024), default=16)
    p.add_argument("--soak-malformed", type=int_range(0, 100_000), default=64)
    p.add_argument("--force", action="store_true", help="replace existing NAME.* files in --out")
    p.set_defaults(func=cmd_bench_serve)
