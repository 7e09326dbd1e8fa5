"""Pipeline parallelism: each stage holds a run of layers, and hidden states flow from stage to stage.

A step on a stage: receive the previous stage's ``StageTensors`` (the first stage embeds the tokens instead), run
its layers (``models/pipeline_stage.py`` builds the stage's model), send them on. The last stage samples and sends
the tokens back to the first stage, whose ranks need them as the next step's inputs (overlap scheduling leaves
those tokens on the device); the driver also gets any logprobs. Every message's shape follows from the step's host
arrays, which all ranks have, so nothing but tensors is sent.

Several micro-batches are in the pipe at once, one per stage: the scheduler hands out disjoint batches (a request
waits while its last step is in flight), so the first stage starts the next micro-batch while later stages work
on earlier ones. Messages between two ranks are matched in the order they were posted, and every rank runs the
steps in the driver's order, so nothing needs a tag. A step that reads tokens still on the device (overlap
scheduling without micro-batches) waits for the previous step's tokens first.

On CUDA each stage replays decode steps from CUDA graphs like a whole model does, and the driver copies a step's
results to the host on a side stream that waits only for their receives: collecting step N must not wait for the
later micro-batches already queued on the first stage's stream.
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
from nanovllm.executor.base import LaunchedStep, ModelOutput
from nanovllm.executor.cuda_graph import ForwardOutput
from nanovllm.executor.input_batch import ForwardBatch, HostBatch, to_forward_batch
from nanovllm.executor.model_runner import ModelRunner
from nanovllm.models.pipeline_stage import StageTensors, stage_layer_range, stage_model_class
from nanovllm.models.registry import get_model_class

logger = logging.getLogger(__name__)


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
class PipelineStep(LaunchedStep):
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

    @property
    def receives_stage_input(self) -> bool:
        return not self.groups.is_first_stage

    # ---- a step -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def launch(self, host: HostBatch, copy_results: bool = True) -> LaunchedStep:
        groups = self.groups
        if host.pending_rows is not None:  # this step reads the previous step's tokens on the device
            self._wait_for_tokens(keep=0)
        else:  # micro-batches: bound the receives left open to one per stage
            self._wait_for_tokens(keep=groups.pp_size - 1)
        stage_input = None if groups.is_first_stage else self._recv_hidden(host.num_tokens)
        self.copy_pages(host.page_copies)
        batch = to_forward_batch(host, self.stager)
        if not groups.is_first_stage:
            batch.pending_rows = None  # only the first stage reads token ids
        out = self.forward(batch, stage_input)
        step = PipelineStep.for_batch(host)
        if not groups.is_last_stage:
            assert out.to_next_stage is not None
            to_next = torch.stack([out.to_next_stage.hidden, out.to_next_stage.residual])
            dist.send(to_next, dst=groups.peer_in_stage(groups.pp_rank + 1))
            if groups.is_first_stage:
                self._receive_results(host, step, driver=copy_results)
            return step
        self._send_results(batch, out)
        return step

    def collect(self, step: PipelineStep) -> ModelOutput:  # type: ignore[override]
        if step.event is None:  # gloo: the receives complete on the host
            for work in step.works:
                work.wait()
        return super().collect(step)

    def _recv_hidden(self, num_tokens: int) -> StageTensors:
        buffer = torch.empty(2, num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(buffer, src=self.groups.peer_in_stage(self.groups.pp_rank - 1))
        return StageTensors(buffer[0], buffer[1])

    def _wait_for_tokens(self, keep: int) -> None:
        """Complete the oldest token receives until at most ``keep`` remain open."""
        while len(self._token_receives) > keep:
            work, tokens = self._token_receives.popleft()
            work.wait()
            self.last_sampled = tokens

    def _receive_results(self, host: HostBatch, step: PipelineStep, driver: bool) -> None:
        """First stage: post receives for what the last stage will send (shapes follow from ``host``)."""
        src = self.groups.peer_in_stage(self.groups.pp_size - 1)

        def receive(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
            step.works.append(_Receive(tensor, src))
            return tensor

        if host.sampling is not None:
            tokens = receive((host.num_sampled,), torch.int64)
            self._token_receives.append((step.works[-1], tokens))
            if driver:
                step.token_ids = tokens
                if host.sampling.num_logprobs >= 0:
                    shape = (host.num_sampled, host.sampling.num_logprobs + 1)
                    step.logprobs = (receive(shape, torch.int64), receive(shape, torch.float32))
        if driver and host.prompt is not None:
            shape = (host.prompt.rows.shape[0], host.prompt.top_n + 1)
            step.prompt_ids, step.prompt_values = receive(shape, torch.int64), receive(shape, torch.float32)
        if driver and self.device.type == "cuda" and step.works:
            self._copy_results_to_host(step)

    def _copy_results_to_host(self, step: PipelineStep) -> None:
        """On a side stream that waits for this step's receives alone, so ``collect`` does not also wait for the
        micro-batches queued after it on the main stream."""
        if self._results_stream is None:
            self._results_stream = torch.cuda.Stream(self.device)
        stream = self._results_stream
        with torch.cuda.stream(stream):
            for work in step.works:
                work.wait()
                work.tensor.record_stream(stream)  # its memory must outlive the copy, not just the main stream's use
            if step.token_ids is not None:
                step.token_ids = self._to_host(step.token_ids)
            if step.logprobs is not None:
                step.logprobs = (self._to_host(step.logprobs[0]), self._to_host(step.logprobs[1]))
            if step.prompt_ids is not None and step.prompt_values is not None:
                step.prompt_ids, step.prompt_values = self._to_host(step.prompt_ids), self._to_host(step.prompt_values)
            step.event = torch.cuda.Event()
            step.event.record(stream)

    def _send_results(self, batch: ForwardBatch, out: ForwardOutput) -> None:
        """Last stage: sample (every rank of the stage, identically) and send back in the order received."""
        groups = self.groups
        to_driver = groups.tp_rank == 0
        if batch.sampling is not None:
            sampled = self.sampler(out.logits, batch.sampling)
            dist.send(sampled.token_ids.to(torch.int64), dst=groups.peer_in_stage(0))
            if to_driver and sampled.logprobs is not None:
                dist.send(sampled.logprob_ids.to(torch.int64).contiguous(), dst=0)
                dist.send(sampled.logprobs.float().contiguous(), dst=0)
        if batch.prompt is not None:  # every rank of the stage takes part in the LM head's all-gather
            ids, values = self.score_prompt(batch, out.hidden)
            if to_driver:
                dist.send(ids.to(torch.int64).contiguous(), dst=0)
                dist.send(values.float().contiguous(), dst=0)
