"""Pipeline parallelism: each stage holds a run of layers, and hidden states flow from stage to stage.

The first stage also holds the token embedding, the last the final norm and the LM head. A step on a stage:
receive the previous stage's ``(hidden, residual)`` (the first stage embeds the tokens instead), run its layers,
send the pair on. The last stage samples and sends the tokens back to the first stage, whose ranks need them as the
next step's inputs (overlap scheduling leaves those tokens on the device); the driver also gets any logprobs. Every
message's shape follows from the step's host arrays, which all ranks have, so nothing but tensors is sent.

The stage's model is the family's own class with ``make_layer`` wrapped: a layer another stage owns is built as a
parameterless ``MissingLayer``, so no rank allocates layers it does not run. Every model here is a ``Qwen3Model``
(``model.embed_tokens``, ``model.layers``, ``model.norm``), which is all the stage forward relies on.

Several micro-batches are in the pipe at once, one per stage: the scheduler hands out disjoint batches (a request
waits while its last step is in flight), so the first stage starts the next micro-batch while later stages work
on earlier ones. Messages between two ranks are matched in the order they were posted, and every rank runs the
steps in the driver's order, so nothing needs a tag. A step that reads tokens still on the device (overlap
scheduling without micro-batches) waits for the previous step's tokens first.

On CUDA each stage replays decode steps from CUDA graphs like a whole model does (``CUDAGraphRunner`` keeps a
static input for a received ``(hidden, residual)``), and the driver copies a step's results to the host on a side
stream that waits only for their receives: collecting step N must not wait for the later micro-batches already
queued on the first stage's stream.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nanovllm.config import EngineConfig
from nanovllm.distributed.groups import ParallelGroups, get_parallel_groups
from nanovllm.engine.scheduler import ModelOutput
from nanovllm.executor.input_batch import HostBatch, to_forward_batch
from nanovllm.executor.logprobs import PendingStep
from nanovllm.executor.model_runner import ModelRunner
from nanovllm.layers.linear import PartialSums
from nanovllm.models.registry import get_model_class

logger = logging.getLogger(__name__)


def stage_layer_range(num_layers: int, num_stages: int, stage: int) -> tuple[int, int]:
    """Layers [start, end) of ``stage``; the first ``num_layers % num_stages`` stages take one extra layer (the last
    stage already runs the norm and the LM head)."""
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


class MissingLayer(nn.Module):
    """Stands in for a layer another stage owns: no parameters, never run."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("a layer owned by another pipeline stage was run")


def stage_model_class(base: type[nn.Module], start: int, end: int, first: bool, last: bool) -> type[nn.Module]:
    """``base`` (a model family's class) reduced to the layers [start, end) and the ends of the model it owns."""

    class PipelineStage(base):  # type: ignore[misc, valid-type]
        is_pipeline_stage = True  # the loader skips checkpoint tensors of layers other stages own
        stage_is_first, stage_is_last = first, last

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            inner = getattr(self, "model", None)
            if inner is None or not all(hasattr(inner, n) for n in ("embed_tokens", "layers", "norm")):
                raise ValueError(f"{base.__name__} does not have the embed_tokens / layers / norm layout that "
                                 "pipeline parallelism splits; use tensor_parallel_size instead")
            # (built in full by the family's __init__ and dropped here; the pool is sized after they are freed)
            tied = bool(getattr(self, "tie_word_embeddings", False))
            if not first and not (last and tied):  # a tied last stage keeps it: it is the LM head's weight
                inner.embed_tokens = None
            if not last:
                self.lm_head = None
                inner.norm = None
            self.stage_layers = list(inner.layers[start:end])
            self.stage_hidden_size = config.hidden_size
            self.stage_input: tuple[torch.Tensor, torch.Tensor] | None = None  # set by the runner before forward
            self.stage_output: tuple[torch.Tensor, torch.Tensor] | None = None

        def make_layer(self, config: Any, layer_index: int) -> nn.Module:
            if start <= layer_index < end:
                return super().make_layer(config, layer_index)
            return MissingLayer()

        def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            inner = self.model
            if first:
                hidden, residual = inner.embed_tokens(input_ids), None
            elif self.stage_input is not None:
                (hidden, residual), self.stage_input = self.stage_input, None
            else:  # memory profiling or the decode-kernel warm-up: no previous stage ran
                dtype = next(self.parameters()).dtype
                hidden = torch.zeros(input_ids.shape[0], self.stage_hidden_size, dtype=dtype, device=input_ids.device)
                residual = hidden.clone()
            for layer in self.stage_layers:
                hidden, residual = layer(positions, hidden, residual)
            if last:
                hidden, _ = inner.norm(hidden, residual)
                return hidden
            if isinstance(hidden, PartialSums):  # the next stage's first norm gets a plain tensor
                hidden = hidden.materialize()
            self.stage_output = (hidden, residual)
            return hidden

        def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
            return super().compute_logits(hidden) if last else None

    PipelineStage.__name__ = PipelineStage.__qualname__ = f"{base.__name__}[layers {start}:{end}]"
    return PipelineStage


class _Receive:
    """A posted receive whose ``wait`` may be called more than once: the first stage waits for a step's tokens
    before the next step, the driver's results copy again. A gloo wait blocks the host, and a second one would block
    until its timeout, so it runs once; an NCCL wait only makes the current stream wait, so it runs on every call
    (each stream that reads the tensor needs its own)."""

    def __init__(self, tensor: torch.Tensor, src: int) -> None:
        self.tensor = tensor
        self.work = dist.irecv(tensor, src=src)
        self.waits_on_host = not tensor.is_cuda
        self.done = False

    def wait(self) -> None:
        if not self.done:
            self.work.wait()
            self.done = self.waits_on_host


@dataclasses.dataclass
class PipelinePending(PendingStep):
    works: list[_Receive] = dataclasses.field(default_factory=list)  # receives of this step's results


class PipelineStageRunner(ModelRunner):
    """A ``ModelRunner`` for one rank of one stage."""

    def __init__(self, config: EngineConfig, model_path: str) -> None:
        groups = get_parallel_groups()
        assert groups is not None and groups.pp_size > 1
        self.groups: ParallelGroups = groups
        hf_config = config.hf_config
        self.layer_range = stage_layer_range(hf_config.num_hidden_layers, groups.pp_size, groups.pp_rank)
        self.hidden_size = hf_config.hidden_size
        # first stage: the sampled tokens on their way back from the last stage, oldest first
        self._token_receives: deque[tuple[_Receive, torch.Tensor]] = deque()
        self._results_stream: torch.cuda.Stream | None = None  # the driver's copies of received results
        super().__init__(config, model_path)
        logger.info("pipeline stage %d of %d: layers %d..%d", groups.pp_rank, groups.pp_size,
                    self.layer_range[0], self.layer_range[1] - 1)

    def model_class(self, hf_config: Any) -> type[nn.Module]:
        start, end = self.layer_range
        return stage_model_class(get_model_class(hf_config), start, end, self.groups.is_first_stage,
                                 self.groups.is_last_stage)

    # ---- a step -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def launch_host(self, host: HostBatch, sampled_chunks: list | None) -> PendingStep:
        groups = self.groups
        if "pending_rows" in host.arrays:  # this step reads the previous step's tokens on the device
            self._wait_for_tokens(keep=0)
        else:  # micro-batches: bound the receives left open to one per stage
            self._wait_for_tokens(keep=groups.pp_size - 1)
        num_tokens = host.arrays["input_ids"].shape[0]
        if not groups.is_first_stage:
            self.model.stage_input = self._recv_hidden(num_tokens)
        self.copy_pages(host.page_copies)
        batch = to_forward_batch(host, self.stager)
        if not groups.is_first_stage:
            batch.pending_rows = None  # only the first stage reads token ids
        logits, hidden = self.forward(batch)
        pending = PipelinePending(sampled_chunks or [])
        if not groups.is_last_stage:
            stage_output, self.model.stage_output = self.model.stage_output, None
            dist.send(torch.stack(stage_output), dst=groups.peer_in_stage(groups.pp_rank + 1))
            if groups.is_first_stage:
                self._receive_results(host, pending, driver=sampled_chunks is not None)
            return pending
        self._send_results(batch, logits, hidden)
        return pending

    def collect(self, pending: PipelinePending) -> ModelOutput:  # type: ignore[override]
        if pending.event is None:  # gloo: the receives complete on the host
            for work in pending.works:
                work.wait()
        return super().collect(pending)

    def _recv_hidden(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = torch.empty(2, num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(buffer, src=self.groups.peer_in_stage(self.groups.pp_rank - 1))
        return buffer[0], buffer[1]

    def _wait_for_tokens(self, keep: int) -> None:
        """Complete the oldest token receives until at most ``keep`` remain open."""
        while len(self._token_receives) > keep:
            work, tokens = self._token_receives.popleft()
            work.wait()
            self.last_sampled = tokens

    def _receive_results(self, host: HostBatch, pending: PipelinePending, driver: bool) -> None:
        """First stage: post receives for what the last stage will send (shapes follow from ``host``)."""
        src = self.groups.peer_in_stage(self.groups.pp_size - 1)

        def receive(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
            pending.works.append(_Receive(tensor, src))
            return tensor

        if host.sampling_flags is not None:
            num_rows = host.arrays["logits_indices"].shape[0]
            tokens = receive((num_rows,), torch.int64)
            self._token_receives.append((pending.works[-1], tokens))
            if driver:
                pending.assign_sample_rows()
                pending.token_ids = tokens
                if host.num_logprobs >= 0:
                    shape = (num_rows, host.num_logprobs + 1)
                    pending.logprobs = (receive(shape, torch.int64), receive(shape, torch.float32))
        if driver and host.prompt_spans:
            shape = (host.arrays["prompt_rows"].shape[0], max(n for _, _, n in host.prompt_spans) + 1)
            ids, values = receive(shape, torch.int64), receive(shape, torch.float32)
            pending.prompt = (ids, values, host.prompt_spans)
        if driver and self.device.type == "cuda" and pending.works:
            self._copy_results_to_host(pending)

    def _copy_results_to_host(self, pending: PipelinePending) -> None:
        """On a side stream that waits for this step's receives alone, so ``collect`` does not also wait for the
        micro-batches queued after it on the main stream."""
        if self._results_stream is None:
            self._results_stream = torch.cuda.Stream(self.device)
        stream = self._results_stream
        with torch.cuda.stream(stream):
            for work in pending.works:
                work.wait()
                work.tensor.record_stream(stream)  # its memory must outlive the copy, not just the main stream's use
            if pending.token_ids is not None:
                pending.token_ids = self._to_host(pending.token_ids)
            if pending.logprobs is not None:
                pending.logprobs = (self._to_host(pending.logprobs[0]), self._to_host(pending.logprobs[1]))
            if pending.prompt is not None:
                ids, values, spans = pending.prompt
                pending.prompt = (self._to_host(ids), self._to_host(values), spans)
            pending.event = torch.cuda.Event()
            pending.event.record(stream)

    def _send_results(self, batch: Any, logits: torch.Tensor | None, hidden: torch.Tensor) -> None:
        """Last stage: sample (every rank of the stage, identically) and send back in the order received."""
        groups = self.groups
        to_driver = groups.tp_rank == 0
        if batch.sampling is not None:
            sampled = self.sampler(logits, batch.sampling)
            dist.send(sampled.token_ids.to(torch.int64), dst=groups.peer_in_stage(0))
            if to_driver and sampled.logprobs is not None:
                dist.send(sampled.logprob_ids.to(torch.int64).contiguous(), dst=0)
                dist.send(sampled.logprobs.float().contiguous(), dst=0)
        if batch.prompt_spans:  # every rank of the stage takes part in the LM head's all-gather
            ids, values = self.score_prompt(batch, hidden)
            if to_driver:
                dist.send(ids.to(torch.int64).contiguous(), dst=0)
                dist.send(values.float().contiguous(), dst=0)
