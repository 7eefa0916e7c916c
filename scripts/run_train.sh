#!/usr/bin/env bash
# The seed's training entry, mapped onto torchrun and `mobilenetv2 train`. Logs to ./train.log like the seed.
#   bash scripts/run_train.sh CPU [DATASET_PATH] [CKPT_PATH] [FREEZE_LAYER] [FILTER_HEAD]
#   bash scripts/run_train.sh GPU [DEVICE_NUM] [VISIBLE_DEVICES(0,1,2,3)] [DATASET_PATH] [CKPT_PATH] [FREEZE_LAYER] [FILTER_HEAD]
# FREEZE_LAYER: none | backbone;  FILTER_HEAD: True | False.  Extra flags for `mobilenetv2 train` go in
# $MOBILENETV2_ARGS (for example "--epochs 5 --output runs/x").
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$( [ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3 )}"

usage() { sed -n '3,4p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
platform="$1"; shift
case "$platform" in
  CPU) dataset="$1"; ckpt="${2:-}"; freeze="${3:-none}"; filter="${4:-False}"
       launch=("$python" -m mobilenetv2); config="$here/configs/seed_cpu.yaml"; device=cpu ;;
  GPU) [ $# -ge 3 ] || usage
       devices="$1"; export CUDA_VISIBLE_DEVICES="$2"; dataset="$3"; ckpt="${4:-}"; freeze="${5:-none}"; filter="${6:-False}"
       launch=("$python" -m torch.distributed.run --standalone --nproc_per_node "$devices" -m mobilenetv2)
       config="$here/configs/seed_gpu.yaml"; device=cuda ;;
  *) echo "run_train.sh: platform must be CPU or GPU, got '$platform'" >&2; exit 2 ;;
esac
[ -d "$dataset" ] || { echo "run_train.sh: dataset folder not found: $dataset" >&2; exit 2; }
args=(train --config "$config" --data "$dataset" --device "$device" --freeze "$freeze")
[ -n "$ckpt" ] && args+=(--pretrained "$ckpt")
[ "$filter" = "True" ] && args+=(--filter-head)
# shellcheck disable=SC2206
extra=(${MOBILENETV2_ARGS:-})
"${launch[@]}" "${args[@]}" "${extra[@]}" > train.log 2>&1
