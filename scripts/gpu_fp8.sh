#!/usr/bin/env bash
# One device-machine call for FP8 weights: the FP8 kernel and engine GPU tests, the per-shape GEMM timings, then
# Llama-3.1-8B's shape (dummy weights) in bf16 and with quantization=fp8 on the nano-vllm workload.
# SKIP_TESTS=1 / SKIP_GEMM=1 / SKIP_THROUGHPUT=1 leave a part out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
[ -z "${SKIP_TESTS:-}" ] && { timeout "${TEST_TIMEOUT:-300}" python -m pytest -q -p no:cacheprovider \
  tests/gpu/test_fp8_gemm.py tests/gpu/test_fused_moe.py tests/gpu/test_fp8_engine_gpu.py > "$OUT/fp8_tests.log" 2>&1;
  echo "tests exit $?"; tail -30 "$OUT/fp8_tests.log"; }
[ -z "${SKIP_GEMM:-}" ] && { timeout "${GEMM_TIMEOUT:-240}" python -m nanovllm.benchmarks.fp8_gemm \
  --output-json "$OUT/fp8_gemm.json" ${GEMM_ARGS:-} > "$OUT/fp8_gemm.log" 2>&1; echo "gemm exit $?";
  cat "$OUT/fp8_gemm.log"; }
if [ -z "${SKIP_THROUGHPUT:-}" ]; then
  for q in "" "--quantization fp8"; do
    timeout 240 python -m nanovllm.benchmarks.throughput --model llama-3.1-8b $q \
      --output-json "$OUT/throughput-llama8b${q:+-fp8}.json" > "$OUT/throughput-llama8b${q:+-fp8}.log" 2>&1
    echo "llama-3.1-8b ${q:-bf16} exit $?"; grep -v "it/s" "$OUT/throughput-llama8b${q:+-fp8}.log" | tail -8
  done
fi
exit 0
