"""Turn a scheduled batch into the flat tensors a forward needs."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from nanovllm.engine.request import PLACEHOLDER
from nanovllm.engine.scheduler import ScheduledChunk, SchedulerOutput
from nanovllm.executor.staging import HostStager
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


@dataclass
class HostBatch:
    """A step's inputs on the host: plain arrays and numbers, cheap to pickle (tensor-parallel ranks get this)."""

    arrays: dict[str, np.ndarray]
    query_lens: list[int]
    seq_lens: list[int]
    prompt_spans: list[tuple[str, int, int]]
    sampling_flags: dict | None  # None: no row samples
    num_logprobs: int = -1
    page_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write before the forward


def build_forward_batch(sched: SchedulerOutput, block_size: int, vocab_size: int, stager: HostStager) -> ForwardBatch:
    return to_forward_batch(build_host_batch(sched, block_size, vocab_size), stager)


def build_host_batch(sched: SchedulerOutput, block_size: int, vocab_size: int) -> HostBatch:
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

    seq_lens_array = np.asarray(seq_lens, dtype=np.int32)
    arrays = {
        "input_ids": input_ids, "positions": positions, "slot_mapping": slot_mapping,
        "query_start_loc": query_start_loc, "seq_lens": seq_lens_array,
        "block_tables": block_tables, "logits_indices": logits_indices,
    }
    if len(input_ids) == len(chunks):  # decode only: start the longest contexts' attention first
        arrays["decode_order"] = np.argsort(-seq_lens_array, kind="stable").astype(np.int32)
    if pending_rows:
        arrays["pending_rows"] = np.asarray(pending_rows, dtype=np.int64)
        arrays["pending_sources"] = np.asarray(pending_sources, dtype=np.int64)
    if prompt_spans:
        arrays["prompt_rows"] = np.asarray(prompt_rows, dtype=np.int64)
        arrays["prompt_targets"] = np.asarray(prompt_targets, dtype=np.int64)
    sampled_chunks = [chunks[i] for i in sampled_rows]
    host = HostBatch(arrays, query_lens, seq_lens, prompt_spans, None)
    if sampled_chunks:
        host.sampling_flags = _sampling_arrays(sampled_chunks, vocab_size, arrays)
        host.num_logprobs = _rare_sampling_arrays(sampled_chunks, vocab_size, arrays)
    return host


def to_forward_batch(host: HostBatch, stager: HostStager) -> ForwardBatch:
    on_device = stager.transfer(host.arrays)
    meta = AttentionMetadata(
        slot_mapping=on_device["slot_mapping"],
        query_start_loc=on_device["query_start_loc"],
        seq_lens=on_device["seq_lens"],
        block_tables=on_device["block_tables"],
        max_query_len=max(host.query_lens),
        max_seq_len=max(host.seq_lens),
        decode_order=on_device.get("decode_order"),
        query_lens_cpu=host.query_lens,
        seq_lens_cpu=host.seq_lens,
    )
    sampling = None
    if host.sampling_flags is not None:
        sampling = SamplingBatch(
            temperatures=on_device["temperatures"], top_ks=on_device["top_ks"], top_ps=on_device["top_ps"],
            min_ps=on_device["min_ps"], keys=on_device["keys"], **host.sampling_flags,
            num_logprobs=host.num_logprobs,
        )
        if "banned_rows" in on_device:
            sampling.banned = (on_device["banned_rows"], on_device["banned_tokens"])
        if "output_counts" in on_device:
            sampling.penalties = Penalties(
                presence=on_device["presence"], frequency=on_device["frequency"],
                repetition=on_device["repetition"], output_counts=on_device["output_counts"],
                seen=on_device["seen"],
            )
    batch = ForwardBatch(on_device["input_ids"], on_device["positions"], meta, on_device["logits_indices"], sampling)
    batch.pending_rows = on_device.get("pending_rows")
    batch.pending_sources = on_device.get("pending_sources")
    if host.prompt_spans:
        batch.prompt_rows, batch.prompt_targets = on_device["prompt_rows"], on_device["prompt_targets"]
        batch.prompt_spans = host.prompt_spans
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


def _sampling_arrays(chunks: list[ScheduledChunk], vocab_size: int, arrays: dict[str, np.ndarray]) -> dict:
    """Add the per-row sampling settings to ``arrays``; return the flags that pick the sampler's code path."""
    params = [chunk.request.sampling_params for chunk in chunks]
    temperatures = np.asarray([p.temperature for p in params], dtype=np.float32)
    top_ks = np.asarray([p.top_k if p.top_k > 0 else vocab_size for p in params], dtype=np.int64)
    top_ps = np.asarray([p.top_p for p in params], dtype=np.float32)
    min_ps = np.asarray([p.min_p for p in params], dtype=np.float32)
    # the noise of output token i of a request depends only on its seed and i
    seeds = torch.tensor([chunk.request.sampling_seed for chunk in chunks], dtype=torch.int64)
    output_numbers = torch.tensor([c.output_index - c.request.num_prompt_tokens for c in chunks], dtype=torch.int64)
    arrays.update(temperatures=temperatures, top_ks=top_ks, top_ps=top_ps, min_ps=min_ps,
                  keys=row_keys(seeds, output_numbers).numpy())
    return {
        "all_greedy": bool((temperatures == 0).all()),
        "use_top_k_top_p": bool((top_ks < vocab_size).any() or (top_ps < 1.0).any()),
        "use_min_p": bool((min_ps > 0).any()),
    }


def _rare_sampling_arrays(chunks: list[ScheduledChunk], vocab_size: int, arrays: dict[str, np.ndarray]) -> int:
    """min_tokens bans and penalties, added to ``arrays`` only for batches whose requests use them; returns the
    most top logprobs any row asks for (-1: none)."""
    requests = [chunk.request for chunk in chunks]
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
    if banned_rows:
        arrays["banned_rows"] = np.asarray(banned_rows, dtype=np.int64)
        arrays["banned_tokens"] = np.asarray(banned_tokens, dtype=np.int64)
    params = [r.sampling_params for r in requests]
    if any(p.has_penalties for p in params):
        _penalty_arrays(requests, vocab_size, arrays)
    return max((p.logprobs for p in params if p.logprobs is not None), default=-1)


def _penalty_arrays(requests: list, vocab_size: int, arrays: dict[str, np.ndarray]) -> None:
    """Token counts per row, built only for batches where some request uses a penalty."""
    counts = np.zeros((len(requests), vocab_size), dtype=np.float32)
    seen = np.zeros((len(requests), vocab_size), dtype=np.bool_)
    for row, request in enumerate(requests):
        outputs = [t for t in request.output_token_ids if t != PLACEHOLDER]
        np.add.at(counts[row], outputs, 1.0)
        seen[row, request.prompt_token_ids] = True
    seen |= counts > 0
    params = [r.sampling_params for r in requests]
    arrays.update(
        presence=np.asarray([p.presence_penalty for p in params], dtype=np.float32),
        frequency=np.asarray([p.frequency_penalty for p in params], dtype=np.float32),
        repetition=np.asarray([p.repetition_penalty for p in params], dtype=np.float32),
        output_counts=counts,
        seen=seen,
    )
