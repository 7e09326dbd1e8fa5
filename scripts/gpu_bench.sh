#!/usr/bin/env bash
# One device-machine call: the headline throughput run with its per-step breakdown, then the prefix-cache run.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 240 python -m nanovllm.benchmarks.throughput --output-json "$OUT/throughput.json" --step-log "$OUT/steps.json" \
  ${BENCH_ARGS:-} > "$OUT/throughput.log" 2>&1; echo "throughput exit $?"; grep -v "it/s" "$OUT/throughput.log" | tail -16
[ -n "${PREFIX:-}" ] && { timeout 200 python -m nanovllm.benchmarks.shared_prefix > "$OUT/prefix.log" 2>&1;
  echo "prefix exit $?"; grep -v "it/s" "$OUT/prefix.log" | tail -12; }
exit 0
