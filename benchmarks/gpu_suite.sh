#!/usr/bin/env bash
# The prepared GPU benchmark, as it runs on a lent GPU machine (its own python3, our code from src/, nothing
# installed): bash benchmarks/gpu_suite.sh [--cpu] [--no-compile]. Writes gpu_suite.json to $OUT when set.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
PYTHONPATH="$here/src:$here/benchmarks${PYTHONPATH:+:$PYTHONPATH}" exec "$python" "$here/benchmarks/gpu_suite.py" "$@"
