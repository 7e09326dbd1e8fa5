#!/usr/bin/env bash
# One device-machine call for structured outputs: the nano-vllm workload with every second request under a JSON
# schema against the same workload unconstrained, alternating (ROUNDS, default 2), then the structured GPU tests.
# TOKENIZER: a folder with a real tokenizer (docs/benchmarks.md says how SmolLM2's is saved); EXTRA_TESTS: more
# GPU test files to run after the structured ones.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
run() {  # label, structured fraction
  timeout "${BENCH_TIMEOUT:-150}" python -m nanovllm.benchmarks.throughput --disable-tqdm --max-model-len 4096 \
    --tokenizer "${TOKENIZER:?set TOKENIZER}" --structured-fraction "$2" --output-json "$OUT/$1.json" \
    ${BENCH_ARGS:-} > "$OUT/$1.log" 2>&1
  echo "== $1 (exit $?): $(grep -E "^(elapsed|throughput|structured)" "$OUT/$1.log" | tr "\n" " ")"
}
for i in $(seq "${ROUNDS:-2}"); do run "free_$i" 0; run "half_$i" 0.5; done
timeout -s INT -k 20 "${TEST_TIMEOUT:-240}" python -m pytest -q -rfE -p no:cacheprovider tests/gpu/test_structured_gpu.py \
  ${EXTRA_TESTS:-} > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -25 "$OUT/tests.log"
exit 0
