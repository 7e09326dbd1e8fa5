#!/usr/bin/env bash
# One device-machine call: the GPU tests, the headline throughput run, then a profiled short run whose
# top-ops tables and gzipped chrome trace land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -x -p no:cacheprovider -m gpu tests/gpu 2>&1 | tail -15
timeout 200 python -m nanovllm.benchmarks.throughput --output-json "$OUT/throughput.json" ${BENCH_ARGS:-} \
  > "$OUT/throughput.log" 2>&1; grep -v "it/s" "$OUT/throughput.log" | tail -14
timeout 150 python -m nanovllm.benchmarks.throughput --input-len 512 --output-len 32 --profile /tmp/prof \
  > "$OUT/profile.txt" 2>&1; echo "profile exit $?"
gzip -c /tmp/prof/trace.json > "$OUT/trace.json.gz" 2>/dev/null; ls -la "$OUT"
