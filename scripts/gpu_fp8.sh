#!/usr/bin/env bash
# One device-machine call for FP8 weights: the FP8 kernel and engine GPU tests, the per-shape GEMM timings, then
# Llama-3.1-8B's shape (dummy weights) in bf16 and with FP8 weights and KV cache: the nano-vllm workload, and one
# request of 512 prompt tokens and 512 output tokens (single-request decode latency).
# SKIP_TESTS=1 / SKIP_GEMM=1 / SKIP_THROUGHPUT=1 / SKIP_LATENCY=1 leave a part out, TESTS replaces the test list;
# KV_DECODE_ARGS, when set, runs the FP8 decode kernel's sweep (benchmarks/kv_decode.py) with those flags first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
[ -n "${KV_DECODE_ARGS:-}" ] && { timeout "${KV_DECODE_TIMEOUT:-150}" python -m nanovllm.benchmarks.kv_decode \
  $KV_DECODE_ARGS > "$OUT/kv_decode.log" 2>&1; echo "kv_decode exit $?"; cat "$OUT/kv_decode.log"; }
# SIGINT at the time limit: pytest then still prints the failures it met
[ -z "${SKIP_TESTS:-}" ] && { timeout -s INT -k 20 "${TEST_TIMEOUT:-300}" python -m pytest -q -rfE -p no:cacheprovider \
  ${TESTS:-tests/gpu/test_fp8_gemm.py tests/gpu/test_fused_moe.py tests/gpu/test_fp8_engine_gpu.py} \
  > "$OUT/fp8_tests.log" 2>&1;
  echo "tests exit $?"; tail -30 "$OUT/fp8_tests.log"; }
[ -z "${SKIP_GEMM:-}" ] && { timeout "${GEMM_TIMEOUT:-240}" python -m nanovllm.benchmarks.fp8_gemm \
  --output-json "$OUT/fp8_gemm.json" ${GEMM_ARGS:-} > "$OUT/fp8_gemm.log" 2>&1; echo "gemm exit $?";
  cat "$OUT/fp8_gemm.log"; }
if [ -z "${SKIP_THROUGHPUT:-}" ]; then
  for q in "" "--quantization fp8 --kv-cache-dtype fp8"; do
    label=llama8b${q:+-fp8}
    timeout "${THROUGHPUT_TIMEOUT:-200}" python -m nanovllm.benchmarks.throughput --model llama-3.1-8b $q \
      --max-model-len 4096 --disable-tqdm --output-json "$OUT/$label.json" > "$OUT/$label.log" 2>&1
    echo "== $label throughput (exit $?): $(grep -E "^(elapsed|throughput)" "$OUT/$label.log" | tr "\n" " ")"
  done
fi
if [ -z "${SKIP_LATENCY:-}" ]; then
  for q in "" "--quantization fp8 --kv-cache-dtype fp8"; do
    label=llama8b-latency${q:+-fp8}
    timeout "${LATENCY_TIMEOUT:-120}" python -m nanovllm.benchmarks.throughput --model llama-3.1-8b $q \
      --max-model-len 4096 --num-prompts 1 --input-len 512 --output-len 512 --disable-tqdm \
      --output-json "$OUT/$label.json" > "$OUT/$label.log" 2>&1
    echo "== $label (exit $?): $(grep -E "^(elapsed|throughput|floor)" "$OUT/$label.log" | tr "\n" " ")"
  done
fi
exit 0
