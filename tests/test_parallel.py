"""Tensor and pipeline parallelism over several CPU processes (gloo): the same tokens as one process, and clean
failure and shutdown. Every wait here is bounded: a test that breaks fails, it does not hang CI. No bound depends
on how fast processes start: start-up has its own generous timeout, tests shorten the step timeout only once an
engine is up, and other waits are bounded by ``startup_limit_s``, which grows on a loaded machine."""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import psutil
import pytest
from server_helpers import startup_limit_s

from nanovllm import LLM, SamplingParams
from nanovllm.executor.parallel_checks import check_parallel_sizes
from nanovllm.executor.pipeline import stage_layer_range
from nanovllm.testing import build_checkpoint, tiny_config_dict

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# seeded sampling with penalties, logprobs and prompt logprobs: every rank that samples must agree, and the
# driver must get the logprobs from whichever rank computed them
SEEDED = SamplingParams(temperature=0.9, top_k=20, max_tokens=6, seed=7, ignore_eos=True, presence_penalty=0.5,
                        logprobs=2, prompt_logprobs=1)
# one token, a chunked prompt (40 > 16 tokens a step), and a prompt sharing its first pages (prefix cache)
PROMPTS = [[7], list(range(5, 45)), list(range(5, 30))]
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}


def make_llm(path: str, tp: int = 1, pp: int = 1, **kwargs: Any) -> LLM:
    kwargs.setdefault("cpu_kv_cache_gib", 0.01)  # small pools; each rank sizes its own and they agree
    return LLM(path, device="cpu", dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp,
               max_num_batched_tokens=16, **kwargs)


def run(llm: LLM, params: SamplingParams) -> list[Any]:
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [(o.token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in outs]


def assert_close(got: Any, expected: Any) -> None:
    """Tokens equal; logprobs equal up to float32 reduction order (the shards sum in another order)."""
    for (tokens, logprobs, prompt), (tokens_e, logprobs_e, prompt_e) in zip(got, expected, strict=True):
        assert tokens == tokens_e
        for entries, entries_e in ((logprobs or [], logprobs_e or []), (prompt or [], prompt_e or [])):
            assert len(entries) == len(entries_e)
            for entry, entry_e in zip(entries, entries_e):
                if entry_e is None:
                    assert entry is None
                    continue
                assert list(entry) == list(entry_e)
                assert list(entry.values()) == pytest.approx(list(entry_e.values()), abs=1e-4)


def gone(pids: list[int]) -> bool:
    """Whether the processes exit (they normally are gone already; the limit is generous)."""
    deadline = time.monotonic() + startup_limit_s()
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.05)
    return False


# ---- checkpoints and single-process references -------------------------------------------------------------------

@pytest.fixture(scope="module")
def kv1_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    # 1 KV head for 2 ranks (replicated), tied embeddings (the last stage holds the embedding as its LM head),
    # 3 layers over 2 stages (an uneven split)
    return build_checkpoint(tmp_path_factory.mktemp("kv1"), "Qwen3ForCausalLM", num_key_value_heads=1,
                            tie_word_embeddings=True, num_hidden_layers=3)


_REFERENCES: dict[str, Any] = {}


def reference(path: str, params: SamplingParams) -> Any:
    key = f"{path}:{params.temperature}"
    if key not in _REFERENCES:
        _REFERENCES[key] = run(make_llm(path), params)
    return _REFERENCES[key]


@pytest.fixture(params=["dense-gqa", "kv-heads-below-tp", "moe"])
def model(request: pytest.FixtureRequest) -> str:
    fixture = {"dense-gqa": "qwen3_dir", "kv-heads-below-tp": "kv1_dir", "moe": "qwen3_moe_dir"}[request.param]
    return request.getfixturevalue(fixture)


# ---- correctness -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_same_tokens_as_one_process(model: str, layout: str) -> None:
    tp, pp = LAYOUTS[layout]
    expected_greedy, expected_seeded = reference(model, GREEDY), reference(model, SEEDED)
    llm = make_llm(model, tp, pp, async_scheduling=True)  # overlap: next inputs read the last samples on device
    core = llm.engine.core
    pids = core.executor.worker_pids
    in_flight_at_launch: list[int] = []  # steps in flight when another was launched
    shared_at_launch: list[int] = []  # of their requests, how many the new step also has
    launch, schedule = core.executor.launch, core.scheduler.schedule
    scheduled: list[Any] = []  # the step being launched is the one scheduled last

    def recording_schedule() -> Any:
        scheduled.append(schedule())
        return scheduled[-1]

    def recording_launch(batch: Any) -> Any:
        busy = {id(c.request) for flight in core.in_flight for c in flight.sched.chunks}
        in_flight_at_launch.append(len(core.in_flight))
        shared_at_launch.append(len(busy & {id(c.request) for c in scheduled[-1].chunks}))
        return launch(batch)

    core.executor.launch = recording_launch
    core.scheduler.schedule = recording_schedule
    try:
        assert len(pids) == tp * pp - 1
        assert_close(run(llm, GREEDY), expected_greedy)
        assert_close(run(llm, SEEDED), expected_seeded)
    finally:
        llm.shutdown()
    assert gone(pids)
    # a step is launched while another is in flight; in a pipeline the two are disjoint micro-batches (a stage
    # works on one while the next stage works on the other), without one the next step continues the same requests
    assert max(in_flight_at_launch) >= 1
    if pp > 1:
        assert not any(shared_at_launch)
    else:
        assert any(shared_at_launch)


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "tag"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "tag": {"enum": ["a", "bb"]}}}


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_structured_outputs_as_one_process(qwen3_dir: str, layout: str) -> None:
    """Every rank that samples takes the step's grammar bitmask at launch (``samples_later`` is False here): the
    constrained outputs, and an unconstrained one batched with them, are the single process's tokens."""
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    from nanovllm.sampling_params import StructuredOutputsParams

    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=40, structured_outputs=constraint)
              for seed in (1, 2)] + [SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)]

    def outputs(llm: LLM) -> list[list[int]]:
        try:
            return [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        finally:
            llm.shutdown()

    expected = outputs(make_llm(qwen3_dir))
    tp, pp = LAYOUTS[layout]
    llm = make_llm(qwen3_dir, tp, pp, async_scheduling=True)
    assert not llm.engine.core.executor.samples_later
    tokenizer = llm.engine.tokenizer
    got = outputs(llm)
    assert got == expected
    for tokens in got[:2]:
        jsonschema.validate(json.loads(tokenizer.decode(tokens, skip_special_tokens=True)), SCHEMA)


def test_layer_split() -> None:
    assert [stage_layer_range(3, 2, s) for s in range(2)] == [(0, 2), (2, 3)]
    assert [stage_layer_range(28, 3, s) for s in range(3)] == [(0, 10), (10, 19), (19, 28)]


def test_sizes_that_do_not_fit_are_clear_errors(qwen3_dir: str) -> None:
    config = tiny_config_dict("Qwen3ForCausalLM", num_attention_heads=8, num_key_value_heads=2)
    hf = type("Config", (), config)
    check_parallel_sizes(hf, 4, 1)  # 2 KV heads, 4 ranks: each KV head on two ranks
    with pytest.raises(ValueError, match=r"num_attention_heads \(8\).*sizes that work for this model: \[1, 2, 4, 8\]"):
        check_parallel_sizes(hf, 3, 1)
    hf.num_key_value_heads = 3
    hf.num_attention_heads = 6
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) must be divisible by it or divide it"):
        check_parallel_sizes(hf, 2, 1)
    with pytest.raises(ValueError, match="more than the model's 2 layers"):
        check_parallel_sizes(hf, 1, 3)
    before = psutil.Process().children(recursive=True)
    with pytest.raises(ValueError, match="sizes that work"):  # before any worker starts
        make_llm(qwen3_dir, tp=3)
    assert psutil.Process().children(recursive=True) == before


def test_a_tp_rank_reads_only_its_shard(qwen3_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    from nanovllm.checkpoint_slice import CheckpointSlice
    from nanovllm.distributed.parallel_state import set_tp_group
    from nanovllm.loader import load_hf_config, load_weights, safetensors_files
    from nanovllm.models.registry import get_model_class

    full_reads: list[tuple[int, ...]] = []
    materialize = CheckpointSlice.materialize

    def spy(self: CheckpointSlice) -> Any:
        full_reads.append(tuple(self.shape))
        return materialize(self)

    monkeypatch.setattr(CheckpointSlice, "materialize", spy)
    hf_config = load_hf_config(qwen3_dir)
    set_tp_group(None, 1, 2)  # build and load as rank 1 of 2 (loading needs no communication)
    try:
        model = get_model_class(hf_config)(hf_config)
        load_weights(model, qwen3_dir)
    finally:
        set_tp_group(None, 0, 1)
    assert full_reads and all(len(shape) == 1 for shape in full_reads)  # only norms (replicated) in full
    checkpoint = load_file(safetensors_files(qwen3_dir)[0])
    down = checkpoint["model.layers.0.mlp.down_proj.weight"]  # [hidden, intermediate]: rank 1 has the 2nd half
    half = down.shape[1] // 2
    assert model.model.layers[0].mlp.down_proj.weight.equal(down[:, half:])


# ---- failure and shutdown ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_killed_worker_raises_promptly(qwen3_dir: str, layout: str) -> None:
    llm = make_llm(qwen3_dir, *LAYOUTS[layout])
    pids = llm.engine.core.executor.worker_pids
    step_timeout_s = 120.0
    llm.engine.core.executor.set_step_timeout(step_timeout_s)
    try:
        many = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        llm.engine.add_request("long", list(range(5, 40)), many)
        for _ in range(3):  # mid-run: requests in flight
            llm.engine.step()
        os.kill(pids[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank 1 died \(exit code -9\)"):
            for _ in range(1000):
                llm.engine.step()
        assert time.monotonic() - start < step_timeout_s / 2  # noticed, not waited out
        with pytest.raises(RuntimeError, match="shut down"):  # and it stays failed
            llm.generate([[1, 2]], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert gone(pids)


def test_hung_worker_times_out(qwen3_dir: str) -> None:
    llm = make_llm(qwen3_dir, tp=2)
    pids = llm.engine.core.executor.worker_pids
    try:
        llm.engine.core.executor.set_step_timeout(1.0)  # once the engine is up: start-up has its own timeout
        os.kill(pids[0], signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"no answer from the other ranks within 1 s \(is one hung\?\)"):
            llm.generate([[1, 2]], GREEDY, use_tqdm=False)
        assert 1.0 <= time.monotonic() - start < startup_limit_s()  # the step timeout ended it
    finally:
        llm.shutdown()
    assert gone(pids)


def test_idle_longer_than_the_timeout(qwen3_dir: str) -> None:
    """Workers wait for the next step without a deadline: a server may be idle for hours."""
    expected = reference(qwen3_dir, GREEDY)
    llm = make_llm(qwen3_dir, pp=2)
    try:
        start = time.monotonic()
        assert run(llm, GREEDY) == expected
        # a step timeout that a step of this machine, now, keeps to with a wide margin: several times a whole run
        # of a dozen steps
        step_timeout_s = max(1.0, 5 * (time.monotonic() - start))
        llm.engine.core.executor.set_step_timeout(step_timeout_s)
        assert run(llm, GREEDY) == expected  # (so every wait for the next step began under the new timeout)
        time.sleep(step_timeout_s + 0.5)  # idle for longer than it
        assert run(llm, GREEDY) == expected
    finally:
        llm.shutdown()


def test_failed_start_up_is_prompt_and_leaves_the_process_usable(qwen3_dir: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from nanovllm.distributed import groups

    expected = reference(qwen3_dir, GREEDY)
    # a worker that cannot start (its environment breaks its import) fails the engine at once, not at the
    # start-up timeout
    with monkeypatch.context() as patch:
        patch.setenv("NANOVLLM_DIST_TIMEOUT_S", "not a number")  # read by the spawned worker alone
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"a parallel worker failed to start: rank 1 died \(exit code 1\)"):
            make_llm(qwen3_dir, tp=2)
        assert time.monotonic() - start < groups.STARTUP_TIMEOUT_S / 2
    # a rendezvous that fails half-way (here: no other rank ever comes) ...
    with monkeypatch.context() as patch:
        patch.setattr(groups, "STARTUP_TIMEOUT_S", 0.5)
        with pytest.raises(Exception, match="timeout"):
            groups.init_parallel(groups.host_store(2), 0, 2, 1, use_cuda=False)
    # ... leaves this process able to run the next engine, whose workers meet it under the same group names (were
    # they not to, the rendezvous would wait out its timeout: a generous limit here rather than 600 s)
    monkeypatch.setattr(groups, "STARTUP_TIMEOUT_S", startup_limit_s())
    monkeypatch.setenv("NANOVLLM_DIST_STARTUP_TIMEOUT_S", f"{startup_limit_s():.0f}")
    llm = make_llm(qwen3_dir, tp=2)
    try:
        assert run(llm, GREEDY) == expected
    finally:
        llm.shutdown()


def test_garbage_collection_stops_workers(qwen3_dir: str) -> None:
    llm = make_llm(qwen3_dir, tp=2)
    pids = llm.engine.core.executor.worker_pids
    del llm
    gc.collect()
    assert gone(pids)
    llm = make_llm(qwen3_dir, tp=2)  # the process can hold a parallel engine again
    llm.shutdown()


_DRIVER = textwrap.dedent("""
    import sys, time
    from nanovllm import LLM
    llm = LLM(sys.argv[1], device="cpu", dtype="float32", tensor_parallel_size=2, cpu_kv_cache_gib=0.01)
    print(*llm.engine.core.executor.worker_pids, flush=True)
    time.sleep(3600)  # until killed
""")


def test_workers_die_with_a_killed_driver(qwen3_dir: str) -> None:
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, qwen3_dir], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([driver.stdout], [], [], startup_limit_s())  # the engine is up
        assert ready, "the driver did not start its engine"
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 1 and psutil.pid_exists(pids[0])
    finally:
        driver.kill()
        driver.wait(timeout=startup_limit_s())
    assert gone(pids)


# ---- torchrun-style launch ---------------------------------------------------------------------------------------

_RANK0 = textwrap.dedent("""
    import json, sys
    from nanovllm import LLM, SamplingParams
    llm = LLM(sys.argv[1], device="cpu", dtype="float32", tensor_parallel_size=2, pipeline_parallel_size=2,
              cpu_kv_cache_gib=0.01, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = json.loads(sys.argv[2])
    print(json.dumps([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]), flush=True)
    llm.shutdown()
""")


def test_launch_from_environment_variables(qwen3_dir: str, unused_tcp_port: int) -> None:
    """Rank 0 builds the engine; the other ranks run ``python -m nanovllm.entrypoints.worker`` (here on one host)."""
    import json

    limit_s = startup_limit_s()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(unused_tcp_port), WORLD_SIZE="4",
               NANOVLLM_DIST_STARTUP_TIMEOUT_S=f"{limit_s:.0f}", NANOVLLM_DIST_TIMEOUT_S=f"{limit_s:.0f}")
    workers = [subprocess.Popen([sys.executable, "-m", "nanovllm.entrypoints.worker"],
                                env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.DEVNULL)
               for r in (1, 2, 3)]
    try:
        out = subprocess.run([sys.executable, "-c", _RANK0, qwen3_dir, json.dumps(PROMPTS)],
                             env=dict(env, RANK="0", LOCAL_RANK="0"), capture_output=True, text=True,
                             timeout=2 * limit_s, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == [t for t, _, _ in reference(qwen3_dir, GREEDY)]
        for worker in workers:
            assert worker.wait(timeout=limit_s) == 0  # the driver's shutdown ends them
    finally:
        for worker in workers:
            worker.kill()


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
