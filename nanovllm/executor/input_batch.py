"""Turn a scheduled batch into the flat tensors a forward needs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.engine.request import PLACEHOLDER
from nanovllm.engine.scheduler import ScheduledChunk, SchedulerOutput
from nanovllm.layers.attention.metadata import AttentionMetadata
from nanovllm.layers.sampler import Penalties, SamplingBatch, row_keys


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without stalling the host. From pageable memory CUDA first waits for the stream to drain, which
    would undo overlap scheduling; from pinned memory the copy is queued like a kernel."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled] rows whose logits are sampled
    sampling: SamplingBatch | None
    # overlap scheduling: input rows whose token is still on the device, and their row in the last step's samples
    pending_rows: torch.Tensor | None = None
    pending_sources: torch.Tensor | None = None
    # echo / prompt logprobs: rows whose next prompt token is scored, those tokens, and (request id, count, top-N)
    prompt_rows: torch.Tensor | None = None
    prompt_targets: torch.Tensor | None = None
    prompt_spans: list[tuple[str, int, int]] | None = None


def build_forward_batch(
    sched: SchedulerOutput, block_size: int, vocab_size: int, device: torch.device
) -> ForwardBatch:
    chunks = sched.chunks
    query_lens = [chunk.num_tokens for chunk in chunks]
    seq_lens = [chunk.start + chunk.num_tokens for chunk in chunks]
    num_tokens = sum(query_lens)

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
    input_ids = np.asarray(input_list, dtype=np.int64)
    positions = np.asarray(position_list, dtype=np.int64)
    page_index = positions // block_size
    row_of_token = np.repeat(np.arange(len(chunks)), query_lens)
    slot_mapping = block_tables[row_of_token, page_index].astype(np.int64) * block_size + positions % block_size
    query_start_loc = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    sampled_rows = [i for i, chunk in enumerate(chunks) if chunk.sample]
    prompt_rows, prompt_targets, prompt_spans = (
        _prompt_logprob_rows(chunks, query_start_loc) if wants_prompt_logprobs else ([], [], [])
    )
    logits_indices = query_start_loc[1:][sampled_rows] - 1

    def to_device(array: np.ndarray) -> torch.Tensor:
        return host_to_device(torch.from_numpy(array), device)

    meta = AttentionMetadata(
        slot_mapping=to_device(slot_mapping),
        query_start_loc=to_device(query_start_loc),
        seq_lens=to_device(np.asarray(seq_lens, dtype=np.int32)),
        block_tables=to_device(block_tables),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    sampling = build_sampling_batch([chunks[i] for i in sampled_rows], vocab_size, device)
    batch = ForwardBatch(to_device(input_ids), to_device(positions), meta, to_device(logits_indices), sampling)
    if prompt_spans:
        batch.prompt_rows = to_device(np.asarray(prompt_rows, dtype=np.int64))
        batch.prompt_targets = to_device(np.asarray(prompt_targets, dtype=np.int64))
        batch.prompt_spans = prompt_spans
    if pending_rows:
        batch.pending_rows = to_device(np.asarray(pending_rows, dtype=np.int64))
        batch.pending_sources = to_device(np.asarray(pending_sources, dtype=np.int64))
    return batch


def _prompt_logprob_rows(
    chunks: list[ScheduledChunk], query_start_loc: np.ndarray
) -> tuple[list[int], list[int], list[tuple[str, int, int]]]:
    """Row p - 1 scores prompt token p, for every prompt position p >= 1 this step's chunks reach."""
    rows: list[int] = []
    targets: list[int] = []
    spans: list[tuple[str, int, int]] = []
    for i, chunk in enumerate(chunks):
        request = chunk.request
        top_n = request.sampling_params.prompt_logprobs
        end = min(chunk.start + chunk.num_tokens, request.num_prompt_tokens - 1)
        if top_n is None or request.prompt_logprobs_sent or end <= chunk.start:
            continue
        first_row = int(query_start_loc[i])
        rows.extend(range(first_row, first_row + end - chunk.start))
        targets.extend(request.token_ids[chunk.start + 1 : end + 1])
        spans.append((request.request_id, end - chunk.start, top_n))
    return rows, targets, spans


def build_sampling_batch(chunks: list[ScheduledChunk], vocab_size: int, device: torch.device) -> SamplingBatch | None:
    if not chunks:
        return None
    requests = [chunk.request for chunk in chunks]
    # which output token each row samples: its noise and its min_tokens rule depend on that alone
    output_numbers = [chunk.output_index - chunk.request.num_prompt_tokens for chunk in chunks]
    params = [r.sampling_params for r in requests]
    temperatures = [p.temperature for p in params]
    top_ks = [p.top_k if p.top_k > 0 else vocab_size for p in params]
    top_ps = [p.top_p for p in params]
    min_ps = [p.min_p for p in params]
    # the noise of output token i of a request depends only on its seed and i
    keys = row_keys(torch.tensor([r.sampling_seed for r in requests]), torch.tensor(output_numbers))
    banned_rows: list[int] = []
    banned_tokens: list[int] = []
    for row, (request, number) in enumerate(zip(requests, output_numbers)):
        if number < request.sampling_params.min_tokens:
            stop_ids = set(request.sampling_params.stop_token_ids)
            if not request.sampling_params.ignore_eos:
                stop_ids |= request.eos_token_ids
            banned_rows += [row] * len(stop_ids)
            banned_tokens += sorted(stop_ids)
    logprob_counts = [p.logprobs for p in params if p.logprobs is not None]
    banned = None
    if banned_rows:
        banned = (host_to_device(torch.tensor(banned_rows), device), host_to_device(torch.tensor(banned_tokens), device))
    return SamplingBatch(
        temperatures=host_to_device(torch.tensor(temperatures, dtype=torch.float32), device),
        top_ks=host_to_device(torch.tensor(top_ks, dtype=torch.int64), device),
        top_ps=host_to_device(torch.tensor(top_ps, dtype=torch.float32), device),
        min_ps=host_to_device(torch.tensor(min_ps, dtype=torch.float32), device),
        keys=host_to_device(keys, device),
        all_greedy=all(t == 0 for t in temperatures),
        use_top_k_top_p=any(k < vocab_size for k in top_ks) or any(p < 1.0 for p in top_ps),
        use_min_p=any(p > 0 for p in min_ps),
        banned=banned,
        penalties=_penalties(requests, vocab_size, device) if any(p.has_penalties for p in params) else None,
        num_logprobs=max(logprob_counts, default=-1),
    )


def _penalties(requests: list, vocab_size: int, device: torch.device) -> Penalties:
    """Token counts per row, built only for batches where some request uses a penalty."""
    counts = torch.zeros(len(requests), vocab_size)
    seen = torch.zeros(len(requests), vocab_size, dtype=torch.bool)
    for row, request in enumerate(requests):
        outputs = [t for t in request.output_token_ids if t != PLACEHOLDER]
        if outputs:
            counts[row].index_add_(0, torch.tensor(outputs), torch.ones(len(outputs)))
        seen[row, request.prompt_token_ids] = True
    seen |= counts > 0
    params = [r.sampling_params for r in requests]
    return Penalties(
        presence=host_to_device(torch.tensor([p.presence_penalty for p in params]), device),
        frequency=host_to_device(torch.tensor([p.frequency_penalty for p in params]), device),
        repetition=host_to_device(torch.tensor([p.repetition_penalty for p in params]), device),
        output_counts=host_to_device(counts, device),
        seen=host_to_device(seen, device),
    )
