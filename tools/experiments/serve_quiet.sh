#!/usr/bin/env bash
# The serving figures, regenerated on a quiet machine (nothing else running): about 11-12 minutes on the
# 2-core CPU box, small preset, ORT FP32.
#   docs/results/serve_small.{json,md,png}: janusflow bench-serve, chat / images / mixed at 1, 2, 4, 8 clients
#   docs/results/serve_images.json: tools/experiments/serve_images.py (time to first Euler step, images/min)
# Then copy the figures into README.md ("Serving") and docs/serving.md ("Measured") from those files.
#   tools/experiments/serve_quiet.sh [WORKDIR]     (WORKDIR: where the small checkpoint and export are kept,
#                                                  made on the first run, reused after; default /tmp/jf-serve-quiet)
# Smaller (a check that it runs end to end): REQUESTS=4 DURATION=10 IMAGE_REQUESTS=2 OUT=/tmp/x tools/...
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
WORK=${1:-/tmp/jf-serve-quiet}
REQUESTS=${REQUESTS:-24}
DURATION=${DURATION:-40}
IMAGE_REQUESTS=${IMAGE_REQUESTS:-8}
OUT=${OUT:-docs/results}
mkdir -p "$WORK" "$OUT"
[ -f "$WORK/small/config.json" ] || "$PY" -m janusflow_trt.cli make-tiny "$WORK/small" --size small
[ -f "$WORK/onnx/manifest.json" ] || "$PY" -m janusflow_trt.cli export --model "$WORK/small" --out "$WORK/onnx"
uptime
"$PY" -m janusflow_trt.cli bench-serve --model "$WORK/small" --artifacts "$WORK/onnx" --workloads chat,images,mixed \
    --concurrency 1,2,4,8 --max-batch 8 --requests "$REQUESTS" --duration "$DURATION" --out "$OUT" \
    --name serve_small --force
"$PY" tools/experiments/serve_images.py --model "$WORK/small" --artifacts "$WORK/onnx" --steps 30 \
    --requests "$IMAGE_REQUESTS" --out "$OUT/serve_images.json"
uptime
