#!/usr/bin/env bash
# bench serve on the GPU machine (one device call): Qwen3-0.6B shape, dummy weights, the tiny tokenizer.
# The image lacks fastapi/uvicorn/pydantic: download their wheels into .whl/ (see the device README) and carry it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/res
nvidia-smi --query-gpu=name,memory.total --format=csv | tee /tmp/res/gpu.txt
python3 -c "from nanovllm.testing import write_config_only; write_config_only('/tmp/q06', 'qwen3-0.6b', with_tokenizer=True)" || exit 1
start_server() {
  name=$1; shift
  python3 -m nanovllm serve /tmp/q06 --load-format dummy --host 127.0.0.1 --port 8000 --max-model-len 4096 \
      --uvicorn-log-level warning "$@" > /tmp/res/$name.log 2>&1 &
  SERVER=$!
  for i in $(seq 1 300); do curl -sf localhost:8000/health >/dev/null && echo "up after $i s" && return 0; sleep 1; done
  tail -30 /tmp/res/$name.log; return 1
}
stop_server() { kill -TERM $SERVER; wait $SERVER; echo "server exit $?"; }
B="python3 -m nanovllm bench serve --base-url http://127.0.0.1:8000 --vocab-size 10000"
start_server server_default || exit 1
$B --num-prompts 32 --random-input-len 256 --random-output-len 32 > /tmp/res/warmup.txt 2>&1
$B --dataset random --num-prompts 256 --random-input-len 1024 --random-output-len 128 --random-range-ratio 0.5 --save-result /tmp/res/random_inf.json 2>&1 | tee /tmp/res/random_inf.txt
$B --dataset random --num-prompts 256 --random-input-len 1024 --random-output-len 128 --random-range-ratio 0.5 --request-rate 16 --goodput ttft:500 tpot:50 --save-result /tmp/res/random_rate16.json 2>&1 | tee /tmp/res/random_rate16.txt
$B --dataset shared-prefix --num-prompts 256 --shared-prefix-groups 8 --shared-prefix-len 1024 --shared-suffix-len 64 --random-output-len 64 --save-result /tmp/res/shared_prefix.json 2>&1 | tee /tmp/res/shared_prefix.txt
$B --dataset incast --incast-background 16 --incast-burst 32 --incast-burst-input-len 1000 --save-result /tmp/res/incast_default.json 2>&1 | tee /tmp/res/incast_default.txt
curl -s localhost:8000/metrics > /tmp/res/metrics.txt
stop_server
start_server server_chunked --max-num-batched-tokens 512 || exit 1
$B --num-prompts 32 --random-input-len 256 --random-output-len 32 > /tmp/res/warmup2.txt 2>&1
$B --dataset incast --incast-background 16 --incast-burst 32 --incast-burst-input-len 1000 --save-result /tmp/res/incast_512.json 2>&1 | tee /tmp/res/incast_512.txt
stop_server
ps -ef | grep -c spawn_main
tar czf $OUT/results.tgz -C /tmp res
