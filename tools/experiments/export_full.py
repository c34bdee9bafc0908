"""Export every graph of a `full`-size random checkpoint (real JanusFlow-1.3B shapes) and print the time
and peak RSS per graph from the manifest. Not a test: needs ~4 GB of checkpoint plus ~10 GB of ONNX
on disk and a lot of RAM (the model is exported in float32).

    PYTHONPATH=. python benchmarks/export_full.py --work /tmp/jf-full [--graphs llm] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/janusflow-full", help="folder for the checkpoint and the export")
    p.add_argument("--graphs", default=None, help="comma list (default all)")
    p.add_argument("--keep", action="store_true", help="keep the ONNX output afterwards")
    p.add_argument("--json", default=None, help="also write the per-graph numbers to this file")
    args = p.parse_args(argv)

    from janusflow_trt.export_job import export_graphs
    from janusflow_trt.tiny import make_tiny

    work = Path(args.work)
    ckpt, out = work / "ckpt", work / "onnx"
    if not (ckpt / "config.json").is_file():
        t0 = time.perf_counter()
        make_tiny(ckpt, size="full", seed=0, force=True)
        print(f"made full checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    m = export_graphs(ckpt, None, out, graphs=args.graphs, progress=True, force=True)  # our own work dir
    total = time.perf_counter() - t0
    rows = []
    print("phases: export = torch -> ONNX (model in memory); check = checker, ORT, onnxslim (model freed).")
    print("RSS is the whole process: 'start' is what it held when the phase began.")
    print(f"{'graph':8} {'exporter':8} {'export s':>9} {'start/peak MB':>15} {'check s':>8} {'start/peak MB':>15} "
          f"{'file MB':>8}  simplified")
    for name, g in m["graphs"].items():
        size = sum(f.stat().st_size for f in out.glob(f"{name}.onnx*")) / 2**20
        keys = ("exporter", "seconds", "peak_rss_mb", "export_seconds", "export_start_rss_mb", "export_peak_rss_mb",
                "check_seconds", "check_start_rss_mb", "check_peak_rss_mb", "simplified")
        rows.append({"graph": name, "file_mb": round(size, 1), **{k: g[k] for k in keys}})
        print(f"{name:8} {g['exporter']:8} {g['export_seconds']:9.1f} "
              f"{g['export_start_rss_mb']:7.0f}/{g['export_peak_rss_mb']:<7.0f} {g['check_seconds']:8.1f} "
              f"{g['check_start_rss_mb']:7.0f}/{g['check_peak_rss_mb']:<7.0f} {size:8.0f}  {g['simplified']}")
    print(f"total {total:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"total_s": round(total, 1), "graphs": rows}, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
