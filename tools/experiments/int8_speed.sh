#!/bin/bash
# Issue 24, "speed kept": int8-cpu at the golden widths, both initialisations, the quality gate's graphs vs
# the same recipe without the gate's exclusions, FP32 ORT the baseline, in one bench process. Run it alone
# on the machine. Exports into $WORK once (golden, --gate quick --calib-plan lean, ~5-10 min per init on
# 2 quiet cores); existing exports there are reused, then the bench (~2 min per variant). Rewrites
# docs/results/int8_golden_bench.json and prints the ratios.
#   tools/experiments/int8_speed.sh                  # WORK=/tmp/int8_speed
#   WORK=/tmp/x tools/experiments/int8_speed.sh --size tiny --out /tmp/x/bench.json   # a quick check
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHONPATH=. "${PYTHON:-.venv/bin/python}" tools/experiments/int8_speed.py --work "${WORK:-/tmp/int8_speed}" "$@"
