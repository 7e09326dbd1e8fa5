"""A request that leaves a step before launch (``Scheduler.take_out_of_step``, used when its grammar ended while the
step was being scheduled, and by ``fail_request``) must not leave KV that was never computed in the prefix cache.

Scenario in the engine: on tensor or pipeline ranks (the bitmask goes with the launch), a constrained request is
preempted while its last token is still in flight; it is re-admitted in the next schedule (a recompute chunk), then
its matcher takes that token and reports the grammar complete, so its chunk is taken out of the unlaunched step and
the request ends. Its pages are freed into the prefix cache up to ``num_computed_tokens``, which still counted the
removed chunk."""
from __future__ import annotations

from nanovllm.engine.kv_manager import KVCacheManager
from nanovllm.engine.request import Request, RequestStatus
from nanovllm.engine.scheduler import Scheduler
from nanovllm.executor.base import ModelOutput
from nanovllm.sampling_params import SamplingParams

PAGE = 4


def _request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(temperature=0, max_tokens=4), 4, 0)


def test_a_chunk_taken_out_of_its_step_leaves_no_uncomputed_kv_in_the_prefix_cache() -> None:
    kv = KVCacheManager(num_pages=16, page_size=PAGE, enable_prefix_caching=True)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64)
    prompt = list(range(1, 17))
    a = _request("a", prompt)
    scheduler.add_request(a)
    first = scheduler.schedule()  # tokens 0..8: launched and computed
    assert [(c.start, c.num_tokens) for c in first.chunks] == [(0, 8)]
    scheduler.update(first, ModelOutput(token_ids=[]))
    second = scheduler.schedule()  # tokens 8..16: never launched
    assert [(c.start, c.num_tokens) for c in second.chunks] == [(8, 8)]
    assert scheduler.take_out_of_step(a, second)
    scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED)

    # reference: only tokens 0..8 ever had their KV computed, so no later request may be served more from the cache
    b = _request("b", prompt)
    scheduler.add_request(b)
    scheduler.schedule()
    assert b.num_cached_tokens <= 8, f"{b.num_cached_tokens} prompt tokens served from pages never computed"
