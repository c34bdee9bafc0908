#!/usr/bin/env bash
# Issue 26's targets, measured as the issue states them: `janusflow export` at full size (JanusFlow-1.3B
# shapes, `janusflow make-tiny DIR --size full`) under /usr/bin/time -v, run alone on the machine:
#   (a) FP32 alone                                   targets: max RSS <= 9 GB,  wall <= 4 min
#   (b) --precision fp32,fp16,int8-cpu --calib-plan lean (the default --gate auto: `full` at this size)
#                                                    targets: max RSS <= 12 GB, wall <= 12 min
# For each: max RSS and wall from /usr/bin/time, and the export's own table (per graph and variant, per
# phase: seconds and peak RSS; the run's total, also in OUT/manifest.json's `run`).
# Rewrites docs/results/export_full_targets.json (both runs: time -v figures + manifest run/phases).
# Takes ~25-35 min on the 2-core machine (a ~4-5, b ~20-30); needs ~4.2 GB for the checkpoint (made here
# in ~3 min if CKPT lacks it) and ~25 GB of free disk under WORK (removed at the end unless KEEP=1).
#
#   tools/experiments/export_full_targets.sh [CKPT] [WORK]      (defaults /work/wt/full_ckpt /tmp/jf-export-full)
#   ONLY=b tools/experiments/export_full_targets.sh ...         (one of the two runs)
#   EXTRA="--gate full" tools/experiments/export_full_targets.sh /tmp/small_ckpt /tmp/w   (checking the script)
set -euo pipefail
cd "$(dirname "$0")/../.."
CKPT=${1:-/work/wt/full_ckpt}
WORK=${2:-/tmp/jf-export-full}
ONLY=${ONLY:-a,b}
JF=${JF:-.venv/bin/janusflow}
PY=${PY:-.venv/bin/python}
EXTRA=${EXTRA:-}  # more export flags (a check of this script on a small checkpoint: EXTRA="--gate full")
RESULT=${RESULT:-docs/results/export_full_targets.json}
export EXTRA
mkdir -p "$WORK"
if [ ! -f "$CKPT/config.json" ]; then
  echo "making the full-size checkpoint in $CKPT"
  "$JF" make-tiny "$CKPT" --size full
fi

run() {  # name, export flags...
  local name=$1; shift
  rm -rf "${WORK:?}/$name"
  echo "== ($name) janusflow export --model $CKPT --out $WORK/$name $*"
  local rc=0
  # stdout (shown live): each phase's line as it ends, then the export's table; stderr: progress bars
  /usr/bin/time -v -o "$WORK/$name.time" "$JF" export --model "$CKPT" --out "$WORK/$name" "$@" $EXTRA \
    2> "$WORK/$name.err" | tee "$WORK/$name.out" || rc=$?
  tail -n 3 "$WORK/$name.err" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 2
  grep -E "Maximum resident set size|Elapsed \(wall clock\)" "$WORK/$name.time"
  echo "exit code $rc"
}

[[ $ONLY == *a* ]] && run a
[[ $ONLY == *b* ]] && run b --precision fp32,fp16,int8-cpu --calib-plan lean

"$PY" - "$WORK" "$CKPT" "$RESULT" "$ONLY" <<'EOF'
import json, os, re, sys
from pathlib import Path
work, ckpt, result, only = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
cmds = {"a": "janusflow export --model CKPT --out OUT",
        "b": "janusflow export --model CKPT --out OUT --precision fp32,fp16,int8-cpu --calib-plan lean"}
targets = {"a": {"max_rss_gb": 9, "wall_min": 4}, "b": {"max_rss_gb": 12, "wall_min": 12}}
old = json.loads(result.read_text()) if result.is_file() else {}
out = {"note": "tools/experiments/export_full_targets.sh: each run alone under /usr/bin/time -v; "
               "max RSS in GB (1e6 kB), wall in minutes", "checkpoint": ckpt,
       "runs": old.get("runs", {})}
for k in "ab":
    if k not in only:
        continue
    t = (work / f"{k}.time").read_text()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", t).group(1)
    parts = [float(x) for x in wall.split(":")]
    secs = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    if not (work / k / "manifest.json").is_file():  # interrupted or failed: nothing to record
        print(f"({k}) no manifest in {work / k}: not recorded")
        continue
    m = json.loads((work / k / "manifest.json").read_text())
    gate = m.get("quality_gate", {})
    out["runs"][k] = {"command": cmds[k] + (" " + os.environ["EXTRA"] if os.environ.get("EXTRA") else ""),
                      "max_rss_gb": round(rss / 1e6, 2), "wall_min": round(secs / 60, 2),
                      "targets": targets[k], "met": {"rss": rss / 1e6 <= targets[k]["max_rss_gb"],
                                                     "wall": secs / 60 <= targets[k]["wall_min"]},
                      "manifest_run": m.get("run"), "gate": {"preset": gate.get("gate", {}).get("name"),
                                                             "choice": gate.get("choice"),
                                                             "written": {p: r["written"] for p, r in
                                                                         gate.get("precisions", {}).items()}}}
tmp = result.with_suffix(".tmp")
tmp.write_text(json.dumps(out, indent=1) + "\n")
os.replace(tmp, result)
for k, r in out["runs"].items():
    print(f"({k}) max RSS {r['max_rss_gb']:.2f} GB (target {r['targets']['max_rss_gb']}), wall {r['wall_min']:.2f} min "
          f"(target {r['targets']['wall_min']})")
print(f"wrote {result}")
EOF
[ "${KEEP:-0}" = 1 ] || rm -rf "${WORK:?}/a" "${WORK:?}/b"
