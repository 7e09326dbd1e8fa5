#!/usr/bin/env bash
# One device call: the throughput benchmark on two versions of the code, alternating, in one process each.
#   BASE: a directory holding the other version's `nanovllm/` (e.g. an extracted `git archive`), carried along.
#   ROUNDS (default 2): runs of each version; BENCH_ARGS: extra benchmark flags for every run.
# Logs and JSON figures land in $OUT; the last lines printed are one summary row per run.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() {  # label, code directory
  PYTHONPATH=$2 timeout "${BENCH_TIMEOUT:-200}" python -m nanovllm.benchmarks.throughput \
    --output-json "$OUT/$1.json" ${BENCH_ARGS:-} > "$OUT/$1.log" 2>&1
  local rc=$? summary
  summary=$(grep -E "^(elapsed|throughput)" "$OUT/$1.log" | tr "\n" " ")
  echo "== $1 (exit $rc): $summary"
}
for i in $(seq "${ROUNDS:-2}"); do
  run "base_$i" "${BASE:?set BASE to the directory of the other version}"
  run "head_$i" "$PWD"
done
exit 0
