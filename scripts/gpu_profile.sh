#!/usr/bin/env bash
# One device-machine call: scripts/gpu_check.sh over every GPU test, then a profiled short run whose top-ops tables
# and gzipped chrome trace land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
TESTS="-m gpu tests/gpu" BENCH_TIMEOUT=200 bash scripts/gpu_check.sh
timeout 150 python -m nanovllm.benchmarks.throughput --input-len 512 --output-len 32 --profile /tmp/prof \
  > "$OUT/profile.txt" 2>&1; echo "profile exit $?"
gzip -c /tmp/prof/trace.json > "$OUT/trace.json.gz" 2>/dev/null; ls -la "$OUT"
