#!/usr/bin/env bash
# Device call(s) on a several-GPU machine, configured by environment variables (not arguments):
#   PART=check (default): the multi-GPU correctness tests and the MoE-family GPU tests (TESTS overrides the list);
#   any other PART skips them.
#   RUNS="model:tp[:pp] ...": throughput at those parallel sizes; RUN_ARGS: extra benchmark flags for every run.
# Logs and JSON figures land in $OUT. Stuck tests: pytest dumps the driver's stacks after 110 s, and when py-spy is
# installed (carried as a wheel) every Python process's stacks are dumped into stacks.log at 130 s.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nanovllm-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
bench() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python -m nanovllm.benchmarks.throughput --output-json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name (exit $?)"; grep -E "^(elapsed|throughput|floor|device  )" "$OUT/$name.log"
  grep -E "Error|error|did not close|terminate called" "$OUT/$name.log" | tail -3
}
dump_stacks_later() {  # seconds
  local spy; spy=$(command -v py-spy || ls /tmp/site/bin/py-spy 2>/dev/null) || return 0
  (sleep "$1"; for pid in $(pgrep -f python); do
     echo "=== pid $pid: $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-150)"; "$spy" dump --pid "$pid" 2>&1
   done > "$OUT/stacks.log") &
}
if [ "${PART:-check}" = check ]; then
  dump_stacks_later 130
  timeout "${TEST_TIMEOUT:-180}" python -m pytest -q -x -s -p no:cacheprovider -o faulthandler_timeout=110 \
    --log-cli-level=INFO ${TESTS:-tests/gpu/test_parallel_gpu.py \
    tests/gpu/test_engine_gpu.py::test_every_family_on_the_fast_path_matches_the_cpu_engine} > "$OUT/tests.log" 2>&1
  echo "== tests (exit $?)"; grep -E "(PASSED|FAILED|SKIPPED)" "$OUT/tests.log" | cut -c1-120
  tail -2 "$OUT/tests.log"; grep -E "^(E  |FAILED)" "$OUT/tests.log" | head -12
fi
for run in ${RUNS:-}; do
  IFS=: read -r model tp pp <<< "$run"; pp=${pp:-1}
  bench "${model}_tp${tp}_pp${pp}" "${RUN_TIMEOUT:-150}" --model "$model" -tp "$tp" -pp "$pp" ${RUN_ARGS:-}
done
exit 0
