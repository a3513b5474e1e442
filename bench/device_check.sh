#!/usr/bin/env bash
# One command for the GPU machine (well under 8 minutes on an H200): correctness of the Triton
# kernels against dms_kernels.reference on the GPU, then their timings against FlashAttention
# (SDPA flash) with achieved bandwidth next to a measured copy. Writes <date>-h200.md into
# $RESULTS_DIR (default: $OUT when the device tool runs it, else bench/results).
# Without a GPU it runs the same benchmark in its small CPU mode (Triton interpreter), so it cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
RESULTS_DIR="${RESULTS_DIR:-${OUT:-bench/results}}"
mkdir -p "$RESULTS_DIR"
day="$(date +%F)"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version \
    --format=csv > "$RESULTS_DIR/$day-h200-gpu.csv" || true
  timeout 450 "$PY" bench/kernel_bench.py --mode gpu --out "$RESULTS_DIR/$day-h200.md"
else
  TRITON_INTERPRET=1 "$PY" bench/kernel_bench.py --mode cpu --out "$RESULTS_DIR/$day-cpu-small.md"
fi
