"""CUDA graphs for decode: one captured forward (model and LM head) per batch-size bucket.

A decode step launches hundreds of small kernels; replaying them as one graph removes the per-kernel launch cost
from the host. Graphs read their inputs from static buffers, so a step copies its batch into those, pads the batch
up to the bucket (padding rows write no KV and read one token of page 0), and replays.

A pipeline stage is captured the same way: a stage after the first reads the received ``StageTensors`` from a
static buffer instead of embedding tokens, and a stage before the last leaves its ``StageTensors`` as the graph's
output instead of logits.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.executor.input_batch import ForwardBatch
from nanovllm.layers.attention.base import AttentionBackend
from nanovllm.layers.attention.context import set_forward_context
from nanovllm.layers.attention.metadata import AttentionMetadata
from nanovllm.models.pipeline_stage import StageTensors

logger = logging.getLogger(__name__)


def batch_size_buckets(max_batch_size: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    return small + list(range(16, max_batch_size, 16)) + [max_batch_size]


@dataclass
class ForwardOutput:
    """A forward's results: logits of the rows to sample, the hidden states of every row (not from a graph: no
    caller needs them for decode), and on a pipeline stage before the last, the tensors for the next stage."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    to_next_stage: StageTensors | None = None


class CUDAGraphRunner:
    def __init__(
        self, model: nn.Module, backend: AttentionBackend, device: torch.device, dtype: torch.dtype,
        max_batch_size: int, max_model_len: int, block_size: int, receives_stage_input: bool = False,
    ) -> None:
        """``receives_stage_input``: the model is a pipeline stage after the first."""
        self.model = model
        self.backend = backend
        self.buckets = batch_size_buckets(max_batch_size)
        self.max_batch_size = max_batch_size
        max_pages = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch_size,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_batch_size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch_size, max_pages, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch_size + 1, dtype=torch.int32, device=device)
        self.decode_order = torch.arange(max_batch_size, dtype=torch.int32, device=device)
        self.row_ids = torch.arange(max_batch_size, dtype=torch.int32, device=device)
        self.max_model_len = max_model_len
        self.device = device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, ForwardOutput] = {}
        self.stage_input: StageTensors | None = None  # static copies of what the previous stage sent
        if receives_stage_input:
            hidden_size = model.stage_hidden_size
            self.stage_input = StageTensors(
                torch.zeros(max_batch_size, hidden_size, device=device, dtype=dtype),
                torch.zeros(max_batch_size, hidden_size, device=device, dtype=dtype),
            )

    def _meta(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            decode_order=self.decode_order[:batch_size],
        )

    def _forward(self, batch_size: int, meta: AttentionMetadata) -> ForwardOutput:
        args = [self.input_ids[:batch_size], self.positions[:batch_size]]
        if self.stage_input is not None:
            args.append(StageTensors(self.stage_input.hidden[:batch_size], self.stage_input.residual[:batch_size]))
        with set_forward_context(meta, self.backend):
            out = self.model(*args)
        if isinstance(out, StageTensors):
            return ForwardOutput(to_next_stage=out)
        return ForwardOutput(logits=self.model.compute_logits(out))

    @torch.inference_mode()
    def capture(self) -> None:
        # A garbage collection during capture could free an older engine's graphs, and destroying a graph while
        # another is being captured is an illegal CUDA call that can spoil the capture: collect first, then hold.
        gc.collect()
        gc.disable()
        try:
            self._capture_all()
        finally:
            gc.enable()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def _capture_all(self) -> None:
        pool = None
        for batch_size in reversed(self.buckets):  # largest first, so smaller graphs fit in its memory pool
            meta = self._meta(batch_size)
            self.backend.prepare(meta)
            self._forward(batch_size, meta)  # warm-up: compiles kernels and settles the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch_size] = self._forward(batch_size, meta)
            pool = graph.pool() if pool is None else pool
            self.graphs[batch_size] = graph
        torch.cuda.synchronize()

    def release(self) -> None:
        """Destroy the graphs. NCCL cannot tear down a communicator while a graph that captured its collectives
        lives (it waits for those graphs for ever), so a parallel rank calls this before leaving its groups."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
        torch.cuda.synchronize(self.device)  # named: this may run on a thread whose current device is 0

    def can_run(self, batch: ForwardBatch) -> bool:
        """Steps of one token per sequence where every row samples (or none does): a graph yields logits for all
        rows, and a one-token prompt chunk that does not sample yet (a token budget nearly spent on decodes) would
        give the sampler a row too many."""
        meta = batch.meta
        rows_sampled = batch.logits_indices.shape[0] if batch.sampling is not None else meta.num_seqs
        return (meta.is_decode_only and meta.num_seqs <= self.max_batch_size and batch.prompt is None
                and rows_sampled == meta.num_seqs)

    def run(self, batch: ForwardBatch, stage_input: StageTensors | None = None) -> ForwardOutput:
        """Logits of every row (decode rows all sample), or the tensors for the next stage."""
        meta = batch.meta
        size = meta.num_seqs
        bucket = next(b for b in self.buckets if b >= size)
        assert (self.stage_input is None) == (stage_input is None), "a later pipeline stage replays with its input"
        if self.stage_input is not None and stage_input is not None:
            self.stage_input.hidden[:size].copy_(stage_input.hidden)
            self.stage_input.residual[:size].copy_(stage_input.residual)
        self.input_ids[:size].copy_(batch.input_ids)
        self.positions[:size].copy_(batch.positions)
        self.slot_mapping[:size].copy_(meta.slot_mapping)
        self.slot_mapping[size:bucket].fill_(-1)
        self.seq_lens[:size].copy_(meta.seq_lens)
        self.seq_lens[size:bucket].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:size, :width].copy_(meta.block_tables)
        self.block_tables[size:bucket].zero_()
        order = meta.decode_order if meta.decode_order is not None else self.row_ids[:size]
        self.decode_order[:size].copy_(order)
        self.decode_order[size:bucket].copy_(self.row_ids[size:bucket])  # padding rows (length 1) last
        self.graphs[bucket].replay()
        out = self.outputs[bucket]
        if out.to_next_stage is not None:
            return ForwardOutput(to_next_stage=StageTensors(out.to_next_stage.hidden[:size],
                                                          out.to_next_stage.residual[:size]))
        return ForwardOutput(logits=None if out.logits is None else out.logits[:size])
