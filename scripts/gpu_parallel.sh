#!/usr/bin/env bash
# Device call(s) on a several-GPU machine, configured by environment variables (not arguments):
#   PART=check (default): the multi-GPU correctness tests, the MoE-family GPU tests, and Qwen3-30B-A3B throughput
#   on one GPU; any other PART skips them. RUNS="model:tp ...": throughput at those tensor-parallel sizes.
# Logs and JSON figures land in $OUT. A test that runs past 150 s dumps every thread's stack into tests.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
bench() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python -m nanovllm.benchmarks.throughput --output-json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name (exit $?)"; grep -E "^(elapsed|throughput|floor|device  )" "$OUT/$name.log"
  grep -E "Error|error" "$OUT/$name.log" | tail -3
}
if [ "${PART:-check}" = check ]; then
  timeout 330 python -m pytest -q -x -s -p no:cacheprovider -o faulthandler_timeout=150 tests/gpu/test_parallel_gpu.py \
    "tests/gpu/test_engine_gpu.py::test_every_family_on_the_fast_path_matches_the_cpu_engine" > "$OUT/tests.log" 2>&1
  tail -4 "$OUT/tests.log"; grep -E "^(E  |FAILED)" "$OUT/tests.log" | head -12
  bench qwen3-30b-a3b_tp1 200 --model qwen3-30b-a3b
fi
for run in ${RUNS:-}; do
  model=${run%%:*}; tp=${run##*:}
  bench "${model}_tp${tp}" 170 --model "$model" -tp "$tp"
done
exit 0
