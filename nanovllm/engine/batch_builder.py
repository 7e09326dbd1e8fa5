"""The scheduler's decision as the executor's input: a ``HostBatch`` of flat arrays, with no request objects in it."""
from __future__ import annotations

import numpy as np
import torch

from nanovllm.engine.request import PLACEHOLDER, Request
from nanovllm.engine.scheduler import ScheduledChunk, SchedulerOutput
from nanovllm.executor.input_batch import HostBatch, HostPenalties, HostSampling, PromptScoring, PromptSpan
from nanovllm.layers.sampler import row_keys
from nanovllm.sampling_params import SamplingParams


def build_host_batch(sched: SchedulerOutput, block_size: int, vocab_size: int) -> HostBatch:
    """A pure function of the step: a decode row whose input token is still on the device (overlap scheduling)
    reads it from row ``request.sample_row`` of the previous step's samples, which the engine sets at launch."""
    chunks = sched.chunks
    query_lens = [chunk.num_tokens for chunk in chunks]
    seq_lens = [chunk.start + chunk.num_tokens for chunk in chunks]

    input_list: list[int] = []
    position_list: list[int] = []
    max_pages = max(-(-s // block_size) for s in seq_lens)
    block_tables = np.zeros((len(chunks), max_pages), dtype=np.int32)
    pending_rows: list[int] = []
    pending_sources: list[int] = []
    wants_prompt_logprobs = False
    for i, chunk in enumerate(chunks):
        request, start, n = chunk.request, chunk.start, chunk.num_tokens
        if n == 1:  # the common decode row, without slicing
            token = request.token_ids[start]
            if token == PLACEHOLDER:  # its token is still on the device (overlap scheduling)
                pending_rows.append(len(input_list))
                pending_sources.append(request.sample_row)
            input_list.append(token)
            position_list.append(start)
        else:
            input_list.extend(request.token_ids[start : start + n])
            position_list.extend(range(start, start + n))
        pages = request.page_array()
        block_tables[i, : len(pages)] = pages
        wants_prompt_logprobs |= request.sampling_params.prompt_logprobs is not None
    sampled_chunks = sched.sampled_chunks

    positions = np.asarray(position_list, dtype=np.int64)
    page_index = positions // block_size
    row_of_token = np.repeat(np.arange(len(chunks)), query_lens)
    query_start_loc = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    seq_lens_array = np.asarray(seq_lens, dtype=np.int32)
    sampled_rows = [i for i, chunk in enumerate(chunks) if chunk.sample]
    host = HostBatch(
        input_ids=np.asarray(input_list, dtype=np.int64),
        positions=positions,
        slot_mapping=block_tables[row_of_token, page_index].astype(np.int64) * block_size + positions % block_size,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens_array,
        block_tables=block_tables,
        logits_indices=query_start_loc[1:][sampled_rows] - 1,
        query_lens=query_lens,
        page_copies=sched.page_copies,
    )
    if len(input_list) == len(chunks):  # decode only: start the longest contexts' attention first
        host.decode_order = np.argsort(-seq_lens_array, kind="stable").astype(np.int32)
    if pending_rows:
        host.pending_rows = np.asarray(pending_rows, dtype=np.int64)
        host.pending_sources = np.asarray(pending_sources, dtype=np.int64)
    if wants_prompt_logprobs:
        host.prompt = _prompt_scoring(chunks, query_start_loc)
    if sampled_chunks:
        host.sampling = _sampling(sampled_chunks, vocab_size, host.logits_indices)
    return host


def _prompt_scoring(chunks: list[ScheduledChunk], query_start_loc: np.ndarray) -> PromptScoring | None:
    """Row p - 1 scores prompt token p, for every prompt position p >= 1 this step's chunks reach."""
    rows: list[int] = []
    targets: list[int] = []
    spans: list[PromptSpan] = []
    for i, chunk in enumerate(chunks):
        request = chunk.request
        top_n = request.sampling_params.prompt_logprobs
        end = min(chunk.start + chunk.num_tokens, request.num_prompt_tokens - 1)
        if top_n is None or request.prompt_logprobs_sent or end <= chunk.start:
            continue
        first_row = int(query_start_loc[i])
        rows.extend(range(first_row, first_row + end - chunk.start))
        targets.extend(request.token_ids[chunk.start + 1 : end + 1])
        spans.append(PromptSpan(request.request_id, end - chunk.start, top_n))
    if not spans:
        return None
    return PromptScoring(np.asarray(rows, dtype=np.int64), np.asarray(targets, dtype=np.int64), spans)


def _sampling(chunks: list[ScheduledChunk], vocab_size: int, logits_indices: np.ndarray) -> HostSampling:
    requests = [chunk.request for chunk in chunks]
    params = [request.sampling_params for request in requests]
    temperatures = np.asarray([p.temperature for p in params], dtype=np.float32)
    top_ks = np.asarray([p.top_k if p.top_k > 0 else vocab_size for p in params], dtype=np.int64)
    top_ps = np.asarray([p.top_p for p in params], dtype=np.float32)
    min_ps = np.asarray([p.min_p for p in params], dtype=np.float32)
    # the noise of output token i of a request depends only on its seed and i
    seeds = torch.tensor([request.sampling_seed for request in requests], dtype=torch.int64)
    output_numbers = torch.tensor([c.output_index - c.request.num_prompt_tokens for c in chunks], dtype=torch.int64)
    sampling = HostSampling(
        temperatures=temperatures, top_ks=top_ks, top_ps=top_ps, min_ps=min_ps,
        keys=row_keys(seeds, output_numbers).numpy(),
        all_greedy=bool((temperatures == 0).all()),
        use_top_k_top_p=bool((top_ks < vocab_size).any() or (top_ps < 1.0).any()),
        use_min_p=bool((min_ps > 0).any()),
        row_logprobs=[p.logprobs for p in params],
    )
    uses_controls = any(p.logit_bias or p.allowed_token_ids or p.bad_words for p in params)
    _add_banned_tokens(chunks, sampling, logits_indices if uses_controls else None)
    if uses_controls:
        _add_logit_bias_and_allowed(params, sampling)
    if any(p.has_penalties for p in params):
        sampling.penalties = _penalties(requests, vocab_size)
    return sampling


def _add_banned_tokens(chunks: list[ScheduledChunk], sampling: HostSampling, logits_indices: np.ndarray | None) -> None:
    """The stop tokens of requests still short of their ``min_tokens``, and with ``logits_indices`` (some row uses
    a logit control) the bad words' bans."""
    banned_rows: list[int] = []
    banned_tokens: list[int] = []
    for row, chunk in enumerate(chunks):
        params = chunk.request.sampling_params
        if chunk.output_index - chunk.request.num_prompt_tokens < params.min_tokens:
            stop_ids = set(params.stop_token_ids)
            if not params.ignore_eos:
                stop_ids |= chunk.request.eos_token_ids
            banned_rows += [row] * len(stop_ids)
            banned_tokens += sorted(stop_ids)
    if logits_indices is not None:
        _add_bad_words(chunks, sampling, logits_indices, banned_rows, banned_tokens)
    if banned_rows:
        sampling.banned_rows = np.asarray(banned_rows, dtype=np.int64)
        sampling.banned_tokens = np.asarray(banned_tokens, dtype=np.int64)


def _penalties(requests: list[Request], vocab_size: int) -> HostPenalties:
    """Token counts per row, built only for batches where some request uses a penalty."""
    counts = np.zeros((len(requests), vocab_size), dtype=np.float32)
    seen = np.zeros((len(requests), vocab_size), dtype=np.bool_)
    for row, request in enumerate(requests):
        outputs = [t for t in request.output_token_ids if t != PLACEHOLDER]
        np.add.at(counts[row], outputs, 1.0)
        seen[row, request.prompt_token_ids] = True
    seen |= counts > 0
    params = [r.sampling_params for r in requests]
    return HostPenalties(
        presence=np.asarray([p.presence_penalty for p in params], dtype=np.float32),
        frequency=np.asarray([p.frequency_penalty for p in params], dtype=np.float32),
        repetition=np.asarray([p.repetition_penalty for p in params], dtype=np.float32),
        output_counts=counts,
        seen=seen,
    )


def _add_bad_words(
    chunks: list[ScheduledChunk], sampling: HostSampling, logits_indices: np.ndarray,
    banned_rows: list[int], banned_tokens: list[int],
) -> None:
    """A bad word of one token is banned at every step; one of tokens ``t1..tk`` bans ``tk`` when the output so
    far ends with ``t1..t(k-1)``. With overlap scheduling the newest output token may still be on the device (a
    ``PLACEHOLDER`` here): then the host checks ``t1..t(k-2)`` and leaves ``t(k-1)`` to the sampler (``ban_if``)."""
    if_rows: list[int] = []
    if_tokens: list[int] = []
    if_after: list[int] = []
    if_inputs: list[int] = []
    for row, chunk in enumerate(chunks):
        request = chunk.request
        params = request.sampling_params
        if not params.bad_words:
            continue
        words = params.bad_words_token_ids
        if words is None:
            raise ValueError("bad_words are tokenized by the input processor; this request did not go through it")
        tokens = request.token_ids
        end = chunk.output_index  # the output so far is tokens[num_prompt_tokens:end]
        # only the newest token can be on the device: a request is in one step at a time, plus one scheduled
        # ahead of its results with overlap
        pending = tokens[end - 1] == PLACEHOLDER
        for word in words:
            prefix_len = len(word) - 1
            start = end - prefix_len
            if start < request.num_prompt_tokens:
                continue  # the output is shorter than the prefix (a single token word has start == end)
            if not pending or prefix_len == 0:
                if tokens[start:end] == word[:-1]:
                    banned_rows.append(row)
                    banned_tokens.append(word[-1])
            elif tokens[start : end - 1] == word[:-2]:
                if_rows.append(row)
                if_tokens.append(word[-1])
                if_after.append(word[-2])
                if_inputs.append(int(logits_indices[row]))
    if if_rows:
        sampling.ban_if_rows = np.asarray(if_rows, dtype=np.int64)
        sampling.ban_if_tokens = np.asarray(if_tokens, dtype=np.int64)
        sampling.ban_if_after = np.asarray(if_after, dtype=np.int64)
        sampling.ban_if_inputs = np.asarray(if_inputs, dtype=np.int64)


def _add_logit_bias_and_allowed(params: list[SamplingParams], sampling: HostSampling) -> None:
    bias_rows: list[int] = []
    bias_tokens: list[int] = []
    bias_values: list[float] = []
    restricted: list[int] = []
    allowed: list[np.ndarray] = []
    for row, p in enumerate(params):
        if p.logit_bias:
            bias_rows += [row] * len(p.logit_bias)
            bias_tokens += p.logit_bias.keys()
            bias_values += p.logit_bias.values()
        if p.allowed_token_ids:
            restricted.append(row)
            allowed.append(np.asarray(p.allowed_token_ids, dtype=np.int64))
    if bias_rows:
        sampling.bias_rows = np.asarray(bias_rows, dtype=np.int64)
        sampling.bias_tokens = np.asarray(bias_tokens, dtype=np.int64)
        sampling.bias_values = np.asarray(bias_values, dtype=np.float32)
    if restricted:
        sampling.restricted_rows = np.asarray(restricted, dtype=np.int64)
        sampling.allowed_rows = np.repeat(sampling.restricted_rows, [len(a) for a in allowed])
        sampling.allowed_tokens = np.concatenate(allowed)
