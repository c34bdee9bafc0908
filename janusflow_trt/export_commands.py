"""`janusflow export`, `verify`, `build` and `quality` (registered by janusflow_trt/cli.py).

Each command imports what it runs when it runs (the one exception to imports at module top here): the
CLI registers every subcommand on every call, and `janusflow --help` or `build --dry-run` should not load
torch and the exporter (~5 s)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from janusflow_trt.calibration.record import PLANS
from janusflow_trt.errors import JanusFlowError
from janusflow_trt.runtime.argtypes import int_range

# quality_gate.GATE_CHOICES (its import loads torch: spelled out here, tests/test_export_full.py checks they agree)
GATE_CHOICES = ("auto", "default", "quick", "full")


def cmd_export(args) -> int:
    from janusflow_trt.calibration.data import calibration_set
    from janusflow_trt.export.torch_to_onnx import parse_graphs
    from janusflow_trt.export.variants import parse_precisions
    from janusflow_trt.export_job import export_graphs

    graphs = parse_graphs(args.graphs)  # bad names, precisions and calibration inputs fail before anything is loaded
    precisions = parse_precisions(args.precision)
    for flag, path, kind in (("--calib-prompts", args.calib_prompts, "file"), ("--calib-images", args.calib_images,
                             "directory"), ("--vae", args.vae, "directory")):
        if path is not None and not (Path(path).is_file() if kind == "file" else Path(path).is_dir()):
            raise JanusFlowError(f"{flag} {path}: no such {kind}")
    if precisions == ["fp32"] and (args.calib_prompts or args.calib_images):
        raise JanusFlowError("--calib-prompts / --calib-images calibrate fp16 and int8 variants; add them to "
                             "--precision (or drop the calibration flags)")
    inputs = calibration_set(args.calib_prompts, args.calib_images) if precisions != ["fp32"] else None
    m = export_graphs(args.model, args.vae, args.out, graphs=graphs, opset=args.opset,
                      progress=not args.quiet, force=args.force, precisions=precisions, calib_inputs=inputs,
                      vae_precision=args.vae_precision, calib_method=args.calib_method,
                      calib_plan=PLANS[args.calib_plan], gate=args.gate,
                      accept_quality_miss=args.accept_quality_miss)
    for name, g in m["graphs"].items():
        print(f"{name:8} {g['exporter']:7} {g['seconds']:7.1f} s  peak RSS {g['peak_rss_mb']:8.0f} MB  {g['file']}")
        for prec, v in g.get("precisions", {}).items():
            r = v["recipe"]
            kept = r.get("kept_fp32_counts", r.get("kept_fp32")) if prec == "fp16" else \
                f"quantized nodes {r.get('quantized_nodes', 0)} ({r.get('not_quantized', r.get('calibration_method'))})"
            print(f"{'':8} {prec:7} {v.get('seconds', 0):7.1f} s  peak RSS {v.get('peak_rss_mb', 0):8.0f} MB  "
                  f"{v['file']}  {'kept FP32: ' if prec == 'fp16' else ''}{kept}")
    run = m["run"]
    for name, ph in run["phases"].items():
        print(f"phase {name:18} {ph['seconds']:7.1f} s  peak RSS {ph['peak_rss_mb']:8.0f} MB")
    print(f"run total {run['seconds']:7.1f} s  peak RSS {run['peak_rss_mb']:8.0f} MB")
    print(f"wrote {len(m['graphs'])} graph(s) and manifest.json to {args.out}")
    refused = {p: r["miss"] for p, r in m.get("quality_gate", {}).get("precisions", {}).items() if not r["written"]}
    for line in refused.values():
        print(f"not written: {line}", file=sys.stderr)
    return 1 if refused else 0


def cmd_verify(args) -> int:
    from janusflow_trt.export.variants import parse_precisions
    from janusflow_trt.export.verify import verify

    precision = args.precision
    if precision not in parse_precisions(precision):
        raise JanusFlowError(f"--precision takes one precision, got {precision!r}")
    report = verify(args.model, args.artifacts, args.vae, print_table=True,
                    precision=precision)
    if not report.ok:
        for line in report.failure_lines():
            print(f"FAIL {line}", file=sys.stderr)
        return 1
    print(f"parity ok: {len(report.rows)} outputs checked")
    return 0


def cmd_build(args) -> int:
    from janusflow_trt.export.torch_to_onnx import parse_graphs
    from janusflow_trt.export.trt_build import build, format_plan, plan

    graphs = parse_graphs(args.graphs)
    artifacts, out = Path(args.artifacts), Path(args.out)
    if args.dry_run:
        _, plans = plan(artifacts, args.precision, graphs)
        print("\n".join(format_plan(plans, args.precision)))
        return 0
    if not out.parent.is_dir():
        raise JanusFlowError(f"--out: parent directory does not exist: {out.parent}")
    cache = Path(args.timing_cache) if args.timing_cache else None
    if cache is not None and not cache.parent.is_dir():
        raise JanusFlowError(f"--timing-cache: directory does not exist: {cache.parent}")
    m = build(artifacts, out, args.precision, graphs, cache, args.opt_level, args.workspace, progress=not args.quiet,
              force=args.force)
    for name, e in m["engines"].items():
        print(f"{name:8} {e['seconds']:7.1f} s  device memory {e['device_memory_bytes'] / 2**20:8.1f} MiB  {e['file']}")
    print(f"wrote {len(m['engines'])} engine(s) and engines.json to {out} (TensorRT {m['tensorrt_version']}, "
          f"{m['gpu']['name']})")
    return 0


def _int_in(lo: int, hi: int):
    def parse(s: str) -> int:
        v = _opset(s)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}, got {v}")
        return v
    return parse


def _gb(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0 < v < 1024:
        raise argparse.ArgumentTypeError(f"must be in (0, 1024) GB, got {s}")
    return v


def cmd_quality(args) -> int:
    from janusflow_trt.quality import parse_precisions, run_quality, summary_lines

    precisions = parse_precisions(args.precision)
    if args.tokens < 1 or args.steps < 1:
        raise JanusFlowError("--tokens and --steps must be >= 1")
    r = run_quality(args.model, args.artifacts, precisions, args.out, tokens=args.tokens, steps=args.steps,
                    progress=not args.quiet, force=args.force, backend=args.backend)
    for line in summary_lines(r):
        print(line)
    print(f"wrote {args.out}/quality.json, quality.md, quality.png")
    return 0


def _opset(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int: {s!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export the graphs to ONNX (OUT/manifest.json)")
    p.add_argument("--model", required=True, help="checkpoint directory (official JanusFlow layout)")
    p.add_argument("--vae", default=None, help="SDXL-VAE directory in diffusers layout (default MODEL/vae)")
    p.add_argument("--out", required=True, help="output directory, written atomically (an existing one is "
                   "replaced only with --force, and only if it is an earlier export)")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier export")
    p.add_argument("--graphs", default=None,
                   help="comma list of siglip,embed,llm,gen_enc,gen_dec,vae_dec (default all)")
    p.add_argument("--opset", type=_opset, default=18)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--precision", default="fp32",
                   help="comma list of fp32,fp16,int8,int8-cpu (derived from fp32; int8: TensorRT Q/DQ; "
                        "int8-cpu: ONNX Runtime's CPU INT8)")
    p.add_argument("--calib-method", default=None, choices=("minmax", "percentile", "entropy"),
                   help="INT8 activation calibration (default: the best measured end to end, see README)")
    p.add_argument("--vae-precision", default="fp16", choices=("fp16", "fp32"),
                   help="fp16: the VAE's fp16 variant with measured FP32 islands; fp32: keep the VAE all FP32")
    p.add_argument("--calib-prompts", default=None, help="text-to-image calibration prompts, one per line (UTF-8)")
    p.add_argument("--calib-images", default=None, help="directory of calibration photographs for chat")
    p.add_argument("--calib-plan", default="default", choices=tuple(PLANS),
                   help="default: the whole calibration set, every sample measured; lean: a spread subset "
                        "(8 prompts, 1 full Euler run, 4 photos) and <= 8 samples measured per graph (full size)")
    p.add_argument("--gate", default="auto", choices=GATE_CHOICES,
                   help="the quality gate every fp16/int8 variant passes (held out of the calibration set): default "
                        "8 prompts x 30 steps at CFG 2 and 5, 8 pairs x 32 tokens; quick 2 x 4 steps, 2 x 10 tokens; "
                        "full 1 x 3 steps, 2 x 10 tokens; auto (default): default below 300 M LLM decoder-layer "
                        "parameters, full above (JanusFlow-1.3B: 1.2 B); the choice is recorded in the manifest")
    p.add_argument("--accept-quality-miss", action="store_true",
                   help="write a variant that misses the gate's targets, flagged in the manifest (the runtime says so "
                        "on load); without it such a variant is not written and export exits 1")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("verify", help="ONNX Runtime vs torch parity of an export directory")
    p.add_argument("--model", required=True, help="checkpoint directory the artifacts were exported from")
    p.add_argument("--artifacts", required=True, help="export directory with manifest.json")
    p.add_argument("--vae", default=None, help="SDXL-VAE directory (default MODEL/vae)")
    p.add_argument("--precision", default="fp32", help="fp32 | fp16 | int8 | int8-cpu: which exported variant to check")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("build", help="TensorRT engines from an export directory (OUT/engines.json)")
    p.add_argument("--artifacts", required=True, help="export directory with manifest.json")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), required=True,
                   help="which exported variant to parse (networks are strongly typed: no builder precision flags)")
    p.add_argument("--out", required=True, help="engines directory, written atomically (an existing one is "
                   "replaced only with --force, and only if it is an engines directory)")
    p.add_argument("--force", action="store_true", help="replace --out if it is an earlier engines directory")
    p.add_argument("--graphs", default=None, help="comma list of graphs (default all)")
    p.add_argument("--timing-cache", default=None,
                   help="TensorRT timing cache file, rewritten atomically with a sidecar FILE.janusflow holding its "
                        "sha256; an existing FILE is read only if that sidecar matches it (one we wrote), else refused")
    p.add_argument("--opt-level", type=_int_in(0, 5), default=3, help="builder optimisation level 0..5")
    p.add_argument("--workspace", type=_gb, default=8.0, help="workspace memory pool limit, GB")
    p.add_argument("--dry-run", action="store_true", help="print the plan and buffer budget; needs no TensorRT")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_build)

    p = subparsers.add_parser("quality", help="a precision vs FP32 on held-out inputs (quality.json/md/png)")
    p.add_argument("--model", required=True, help="checkpoint directory the artifacts were exported from")
    p.add_argument("--artifacts", default=None, help="export directory with manifest.json (exported precisions)")
    p.add_argument("--precision", default="fp16",
                   help="comma list of precisions to compare with fp32 on the same backend: fp16,int8,int8-cpu "
                        "(exported, over ort) or bf16 (torch-fast, from the checkpoint)")
    p.add_argument("--backend", default=None,
                   help="the backend that runs both sides (default: ort for exported precisions, torch-fast for bf16)")
    p.add_argument("--tokens", type=int_range(1, 4096), default=32, help="chat tokens per held-out pair")
    p.add_argument("--steps", type=int_range(1, 1000), default=30, help="Euler steps per held-out prompt (as generate)")
    p.add_argument("--out", default="quality_out", help="directory for quality.json, quality.md, quality.png")
    p.add_argument("--force", action="store_true", help="replace existing quality.* files in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quality)


__all__ = ["register", "JanusFlowError"]
