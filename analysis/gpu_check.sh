#!/usr/bin/env bash
# make gpu-check: every GPU measurement of the project in one command, at most ~8 minutes on one
# H200, from the source tree (nothing is installed: PYTHONPATH is the checkout). Every step has its
# own time limit, so one failure or hang leaves the rest; logs, docs/benchmarks.md/.json and
# docs/gpu_probe.md/.json are copied to $OUT, and a table of the steps is printed last.
#   OUT=<folder> BUDGET=<seconds> PYTHON=<python> bash analysis/gpu_check.sh
set -u
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/fixedpoint-triton-cache}"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-470}"
START=$(date +%s)
STEPS="$OUT/steps.tsv"
: > "$STEPS"

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME SECONDS COMMAND...: run COMMAND with at most SECONDS (less if the budget is nearly spent)
step() {
  local name="$1" limit="$2" left started code verdict
  shift 2
  left=$(remaining)
  if (( left < 20 )); then
    printf '%s\tSKIPPED\t0\tbudget spent\n' "$name" >> "$STEPS"
    return
  fi
  (( limit > left - 10 )) && limit=$(( left - 10 ))
  echo "== $name (at most ${limit} s)"
  started=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  code=$?
  case $code in
    0) verdict=OK ;;
    124|137) verdict=TIMEOUT ;;
    *) verdict="FAILED($code)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$verdict" "$(( $(date +%s) - started ))" \
    "$(tail -n 1 "$OUT/$name.log" | cut -c1-120)" >> "$STEPS"
  tail -n 3 "$OUT/$name.log" | cut -c1-200
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1
step environment 60 "$PY" -c '
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as error:
    info["triton"] = f"missing: {error}"
print(json.dumps(info))'
step tests_cuda 130 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests
step solve_float64 45 "$PY" -m fixedpoint solve --cell gru --seq-len 512 --device cuda --json
step solve_float32 45 "$PY" -m fixedpoint solve --cell gru --seq-len 512 --device cuda --dtype float32 --json
step kernels 70 "$PY" analysis/gpu_probe.py --device cuda --out docs
step bench_gru 160 "$PY" analysis/bench.py --device cuda --pass forward --cells gru --hiddens 8,64,256 --seq-lens 512,32768
step bench_lstm 50 "$PY" analysis/bench.py --device cuda --pass forward --cells lstm --hiddens 64 --seq-lens 32768
step bench_train 70 "$PY" analysis/bench.py --device cuda --pass train --cells gru --hiddens 64 --seq-lens 32768

cp docs/benchmarks.md docs/benchmarks.json docs/gpu_probe.md docs/gpu_probe.json "$OUT/" 2>/dev/null
echo
echo "==== $(( $(date +%s) - START )) s in all; files in $OUT"
column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
