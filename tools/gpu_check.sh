#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run (at most 8 minutes without --train-minutes):
#   tools/gpu_check.sh                          # one JSON line per figure, on the first CUDA device
#   tools/gpu_check.sh --train-minutes 3        # also train the full-resolution PXD configs; exports under $OUT
#   tools/gpu_check.sh --device cpu --quick     # the CPU fallback the test suite runs
# Uses the Python on PATH (or $PYTHON) with the project importable; installs and downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" tools/gpu_check.py "$@"
