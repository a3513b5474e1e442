#!/usr/bin/env bash
# One command for the GPU machine (well under 8 minutes on an H200): correctness of the Triton and
# CUDA kernels against dms_kernels.reference on the GPU, then their timings against FlashAttention
# (SDPA flash) with achieved bandwidth next to a measured copy. Writes <date>-h200.md (the table),
# <date>-h200.jsonl (each row as it is measured, so a killed run still reports) and
# <date>-h200-cuda-tests.log into $RESULTS_DIR (default: $OUT when the device tool runs it, else
# bench/results).
# On a GPU machine where dms_kernels._cuda does not import (a bare checkout, another Python), it is
# built first with CMake (nvcc, pybind11). Without a GPU it runs the same benchmark in its small
# CPU mode (Triton interpreter; the CUDA rows say "skipped: no CUDA device"), so it cannot rot.
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
  if ! "$PY" -c "import dms_kernels._cuda" 2>/dev/null && command -v nvcc >/dev/null; then
    pyexe="$("$PY" -c 'import sys; print(sys.executable)')"
    build="${TMPDIR:-/tmp}/dms-cuda-build"
    { cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$pyexe" \
        -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
        -DDMS_PYTHON_OUTPUT_DIR="$PWD/dms_kernels" > "$RESULTS_DIR/$day-cuda-build.log" 2>&1 &&
      cmake --build "$build" --target _cuda -j "$(nproc)" >> "$RESULTS_DIR/$day-cuda-build.log" 2>&1; } ||
      echo "dms: could not build dms_kernels._cuda (see $day-cuda-build.log); the CUDA rows are skipped" >&2
  fi
  # The hand-written kernels' GPU tests first, in their own process under a short limit: a hang (a
  # wrong mbarrier phase; the kernels trap after a bounded wait) or a fault poisons only that
  # process's CUDA context, so the Triton checks and the timings below still run and come back.
  skip=()
  if "$PY" -c "import dms_kernels._cuda" 2>/dev/null; then
    tlim=(); "$PY" -c "import pytest_timeout" 2>/dev/null && tlim=(--timeout=60 --timeout-method=thread)
    if ! PYTHONUNBUFFERED=1 timeout -k 5 120 "$PY" -m pytest -q -p no:cacheprovider -rfE "${tlim[@]}" \
        tests/kernels/test_cuda_kernels.py tests/kernels/test_cuda_module.py tests/kernels/test_ops_dispatch.py \
        > "$RESULTS_DIR/$day-h200-cuda-tests.log" 2>&1; then
      skip=(--skip-cuda "the GPU tests of the CUDA kernels failed or hung (see $day-h200-cuda-tests.log)")
      echo "dms: ${skip[1]}" >&2
    fi
  fi
  timeout 270 "$PY" bench/kernel_bench.py --mode gpu --out "$RESULTS_DIR/$day-h200.md" \
    --jsonl "$RESULTS_DIR/$day-h200.jsonl" "${skip[@]}"
else
  TRITON_INTERPRET=1 "$PY" bench/kernel_bench.py --mode cpu --out "$RESULTS_DIR/$day-cpu-small.md"
fi
