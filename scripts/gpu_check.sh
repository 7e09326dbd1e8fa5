#!/usr/bin/env bash
# One device-machine call: the GPU tests, then the throughput benchmark (results under $OUT when set).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/gpu/test_engine_gpu.py} 2>&1 | tail -25
timeout "${BENCH_TIMEOUT:-240}" python -m nanovllm.benchmarks.throughput --output-json "$OUT/throughput.json" ${BENCH_ARGS:-} 2>&1 \
  | grep -v "it/s" | tail -20
