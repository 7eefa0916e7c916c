#!/usr/bin/env bash
# The seed's evaluation entry, mapped onto `mobilenetv2 eval`. Logs to ./eval.log like the seed.
#   bash scripts/run_eval.sh [CPU|GPU] [DATASET_PATH] [CHECKPOINT_PATH]
# Extra flags for `mobilenetv2 eval` go in $MOBILENETV2_ARGS (for example "--resize squash").
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$( [ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3 )}"
[ $# -eq 3 ] || { sed -n '3p' "$0" >&2; exit 2; }
case "$1" in CPU) device=cpu ;; GPU) device=cuda ;; *) echo "run_eval.sh: platform must be CPU or GPU" >&2; exit 2 ;; esac
# shellcheck disable=SC2206
extra=(${MOBILENETV2_ARGS:-})
"$python" -m mobilenetv2 eval --data "$2" --checkpoint "$3" --device "$device" "${extra[@]}" > eval.log 2>&1
