"""The host side of a step: the ``HostBatch`` that ``build_host_batch`` makes from scheduled chunks."""
from __future__ import annotations

import numpy as np

from nanovllm import SamplingParams
from nanovllm.engine.request import Request
from nanovllm.engine.scheduler import ScheduledChunk, SchedulerOutput
from nanovllm.engine.batch_builder import build_host_batch

BLOCK_SIZE = 4


def chunk(name: str, num_tokens: int, start: int, length: int) -> ScheduledChunk:
    """A chunk of ``length`` tokens from ``start`` of a request holding ``num_tokens`` tokens, with its pages."""
    request = Request(name, list(range(1, num_tokens + 1)), SamplingParams(temperature=0), max_tokens=4,
                      sampling_seed=0)
    first_page = 100 * len(name)
    request.set_page_table(list(range(first_page, first_page - (-num_tokens // BLOCK_SIZE))))
    return ScheduledChunk(request, start, length, sample=False)


def host_batch(chunks: list[ScheduledChunk]):
    sched = SchedulerOutput(chunks=chunks, num_batched_tokens=sum(c.num_tokens for c in chunks))
    return build_host_batch(sched, BLOCK_SIZE, vocab_size=64)


def test_decode_order_starts_the_longest_contexts_first():
    lengths = [5, 40, 1, 40, 17, 9]
    chunks = [chunk("r" * (i + 1), n, n - 1, 1) for i, n in enumerate(lengths)]
    host = host_batch(chunks)
    order = host.decode_order
    assert order.dtype == np.int32
    assert sorted(order.tolist()) == list(range(len(lengths)))  # a permutation of the rows
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert order.tolist()[:2] == [1, 3]  # ties keep batch order
    assert host.seq_lens.tolist() == lengths


def test_no_decode_order_for_batches_with_a_prefill():
    chunks = [chunk("a", 12, 11, 1), chunk("bb", 12, 0, 12)]
    assert host_batch(chunks).decode_order is None
