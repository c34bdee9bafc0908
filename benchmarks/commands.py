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
