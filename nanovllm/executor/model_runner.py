"""The model runner: owns the model, the paged KV pool and the sampler on one device, and runs scheduled batches."""
from __future__ import annotations

import logging
import time
from itertools import accumulate
from typing import Any

import numpy as np
import torch

from nanovllm.config import EngineConfig
from nanovllm.distributed.groups import agree_on_kv_pages
from nanovllm.executor.base import LaunchedStep, ModelOutput
from nanovllm.executor.cuda_graph import CUDAGraphRunner, ForwardOutput
from nanovllm.executor.input_batch import ForwardBatch, HostBatch, host_to_device, to_forward_batch
from nanovllm.executor.staging import HostStager
from nanovllm.layers.attention import make_attention_backend
from nanovllm.layers.attention.context import set_forward_context
from nanovllm.layers.attention.kv_quant import is_fp8, kv_cache_torch_dtype
from nanovllm.layers.attention.layer import Attention
from nanovllm.layers.quantization import resolve_quant_config
from nanovllm.layers.sampler import Sampler, top_logprobs
from nanovllm.loader import init_dummy_weights, load_weights
from nanovllm.models.pipeline_stage import StageTensors
from nanovllm.models.registry import get_model_class

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for, but torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def resolve_dtype(name: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # most CPUs run float32 matmuls faster than half precision
    checkpoint_dtype = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = _DTYPES.get(checkpoint_dtype)
    return checkpoint_dtype if checkpoint_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


class ModelRunner:
    """The ``Executor`` of a single-device engine, and each rank's runner in a parallel one."""

    num_micro_batches = 1
    samples_later = True

    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.config = config
        hf_config = config.hf_config
        self.device = resolve_device(config.device)
        self.device_type = self.device.type
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        self.block_size = config.block_size
        self.vocab_size = hf_config.vocab_size
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        # compiled norms and split-K projections (CUDA, not enforce_eager)
        self.fast_path = self.device.type == "cuda" and not config.enforce_eager
        model_class = self.model_class(hf_config)
        quant_config = resolve_quant_config(config.quantization, hf_config)  # FP8 weights, or None
        start = time.perf_counter()
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(hf_config, self.fast_path, quant_config)
        finally:
            torch.set_default_dtype(default_dtype)
        num_kv_scales = 0
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            num_kv_scales = load_weights(self.model, model_path)
        self.model.eval()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self._choose_kv_scales(num_kv_scales)
        self.backend = make_attention_backend(
            config.attention_backend, self.device, self.attention_layers[0], config
        )
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        logger.info("weights: %s (%s) on %s in %s, %.2f GiB, %s in %.2f s; attention backend %s",
                    type(self.model).__name__, model_path, self.device, self.dtype, weight_bytes / (1 << 30),
                    "random (dummy)" if config.load_format == "dummy" else "loaded", time.perf_counter() - start,
                    self.backend.name)
        self.sampler = Sampler()
        self.last_sampled = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._wait_time = 0.0
        self.graphs: CUDAGraphRunner | None = None
        self.stager = HostStager(self.device)
        self._token_slots: list[torch.Tensor] = []
        self._next_token_slot = 0
        start = time.perf_counter()
        self.num_kv_blocks = self._size_kv_pool()
        self._allocate_kv_pool(self.num_kv_blocks)
        pool_tokens = self.num_kv_blocks * self.block_size
        logger.info(
            "KV cache: %d pages of %d tokens = %d tokens, %s, %.2f GiB (%d requests of max_model_len %d at once), "
            "sized in %.2f s", self.num_kv_blocks, self.block_size, pool_tokens,
            str(self.kv_dtype).removeprefix("torch."), self.num_kv_blocks * self.page_bytes() / (1 << 30),
            self.num_kv_blocks // -(-config.max_model_len // self.block_size),
            config.max_model_len, time.perf_counter() - start,
        )
        start = time.perf_counter()
        if self.device.type == "cuda" and not config.enforce_eager and self.backend.name != "torch":
            self.graphs = CUDAGraphRunner(
                self.model, self.backend, self.device, self.dtype, config.max_num_seqs, config.max_model_len,
                self.block_size, receives_stage_input=self.receives_stage_input,
            )
            self.graphs.capture()
            logger.info("CUDA graphs: %d decode batch sizes captured in %.2f s", len(self.graphs.buckets),
                        time.perf_counter() - start)
        elif self.device.type == "cuda" and self.backend.name == "triton":
            self._compile_decode_kernels()
            logger.info("decode kernels compiled in %.2f s (no CUDA graphs: enforce_eager)",
                        time.perf_counter() - start)

    def model_class(self, hf_config: Any) -> type:
        """The class to build (a pipeline stage narrows it to its layers)."""
        return get_model_class(hf_config)

    @property
    def receives_stage_input(self) -> bool:
        """A pipeline stage after the first: its forward starts from the previous stage's ``StageTensors``."""
        return False

    # ---- the KV pool ------------------------------------------------------------------------------------------

    def _choose_kv_scales(self, num_from_checkpoint: int) -> None:
        """An FP8 cache's scales: the checkpoint's, else 1.0, unless measured on the first prefill. The measurement
        is armed here, before any warm-up or graph capture runs a forward, and happens on the first real prefill."""
        if not is_fp8(self.kv_dtype):
            for layer in self.attention_layers:  # unused by a cache in the model's dtype; reset for clarity
                layer.k_scale.fill_(1.0)
                layer.v_scale.fill_(1.0)
            return
        if self.config.calculate_kv_scales:
            for layer in self.attention_layers:
                layer.calibrate_kv_scales()
            source = "measured on the first prefill (calculate_kv_scales)"
        elif num_from_checkpoint:
            source = f"from the checkpoint ({num_from_checkpoint} tensors)"
        else:
            source = "1.0 (the checkpoint has none; calculate_kv_scales measures them)"
        logger.info("KV cache in %s, K/V scales %s", self.config.kv_cache_dtype, source)

    def page_bytes(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * layer.num_kv_heads * layer.head_dim * self.kv_dtype.itemsize
        return per_token * self.block_size * len(self.attention_layers)

    def _size_kv_pool(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        max_useful = self.config.max_num_seqs * -(-self.config.max_model_len // self.block_size)
        if self.device.type == "cpu":
            budget = int(self.config.cpu_kv_cache_gib * (1 << 30))
        else:
            budget = self._free_gpu_memory_for_kv()
        # with several ranks, all use the smallest pool (one page table serves them all)
        num_pages = agree_on_kv_pages(min(budget // self.page_bytes(), max_useful), budget)
        if num_pages <= 0:
            raise ValueError(
                "no memory is left for the KV cache; raise gpu_memory_utilization or use a smaller model"
            )
        return num_pages

    def _free_gpu_memory_for_kv(self) -> int:
        """Run the largest batch once on a throwaway pool, then give the KV pool what the budget leaves."""
        tokens = self.config.max_num_batched_tokens
        scratch_pages = -(-tokens // self.block_size)
        self._allocate_kv_pool(scratch_pages)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._profile_forward(tokens, scratch_pages)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - scratch_pages * self.page_bytes()
        self._allocate_kv_pool(0)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        in_use_elsewhere = total - free - torch.cuda.memory_reserved()
        return int(total * self.config.gpu_memory_utilization) - peak - in_use_elsewhere

    @torch.inference_mode()
    def _profile_forward(self, num_tokens: int, num_pages: int) -> None:
        from nanovllm.layers.attention.metadata import AttentionMetadata

        seq_len = min(num_tokens, self.config.max_model_len)
        num_seqs = -(-num_tokens // seq_len)
        query_lens = [seq_len] * (num_seqs - 1) + [num_tokens - seq_len * (num_seqs - 1)]
        pages_per_seq = -(-seq_len // self.block_size)
        block_tables = torch.arange(num_seqs * pages_per_seq, device=self.device, dtype=torch.int32)
        block_tables = (block_tables % num_pages).view(num_seqs, pages_per_seq)
        meta = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
            query_start_loc=torch.tensor([0, *accumulate(query_lens)], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(query_lens, dtype=torch.int32, device=self.device),
            block_tables=block_tables,
            max_query_len=max(query_lens),
            max_seq_len=max(query_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=query_lens,
        )
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in query_lens])
        with set_forward_context(meta, self.backend):
            hidden = self.model(input_ids, positions)
        if isinstance(hidden, StageTensors):  # a pipeline stage before the last: no logits here
            return
        last_rows = meta.query_start_loc[1:].long() - 1
        self.model.compute_logits(hidden[last_rows.repeat(-(-self.config.max_num_seqs // num_seqs))])

    @torch.inference_mode()
    def _compile_decode_kernels(self) -> None:
        """Decode splits each sequence's KV in a number of parts chosen from the batch size, and every number is a
        kernel variant; compiled in the middle of a run each one stalls it for about a second. Graph capture
        compiles them all; running eagerly, one tiny decode forward per split count does it here."""
        from nanovllm.layers.attention.metadata import AttentionMetadata

        # the batch sizes follow from the SM count: tensor-parallel ranks must have the same GPU, as their forwards'
        # collectives must match
        first_batch_of: dict[int, int] = {}
        for batch in range(1, min(self.config.max_num_seqs, self.config.max_num_batched_tokens) + 1):
            first_batch_of.setdefault(self.backend.num_splits_for(batch), batch)
        for batch in first_batch_of.values():
            rows = torch.arange(batch, dtype=torch.int32, device=self.device)
            meta = AttentionMetadata(  # one token of page 0 per row, nothing written
                slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device=self.device),
                query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=self.device),
                seq_lens=torch.ones(batch, dtype=torch.int32, device=self.device),
                block_tables=torch.zeros(batch, 1, dtype=torch.int32, device=self.device),
                max_query_len=1, max_seq_len=1, decode_order=rows,
            )
            zeros = torch.zeros(batch, dtype=torch.int64, device=self.device)  # token 0 at position 0
            self.backend.prepare(meta)
            with set_forward_context(meta, self.backend):
                out = self.model(zeros, zeros)
            if not isinstance(out, StageTensors):
                self.model.compute_logits(out)
        logger.debug("compiled decode kernels for KV split counts %s", sorted(first_batch_of))

    def _allocate_kv_pool(self, num_pages: int) -> None:
        layer = self.attention_layers[0]
        shape = (2, len(self.attention_layers), num_pages, self.block_size, layer.num_kv_heads, layer.head_dim)
        self.kv_pool = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        for i, attention in enumerate(self.attention_layers):
            attention.k_cache = self.kv_pool[0, i]
            attention.v_cache = self.kv_pool[1, i]

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src = host_to_device(torch.tensor([s for s, _ in copies]), self.device)
            dst = host_to_device(torch.tensor([d for _, d in copies]), self.device)
            pool = self.kv_pool.view(torch.uint8) if is_fp8(self.kv_dtype) else self.kv_pool  # no FP8 index_put
            pool[:, :, dst] = pool[:, :, src]

    def release_graphs(self) -> None:
        """Drop the CUDA graphs (decode runs eagerly afterwards); see ``CUDAGraphRunner.release``."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def model_info(self) -> dict[str, int]:
        params = list(self.model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())
        embedding = self.model.model.embed_tokens.weight
        matmul_params = sum(p.numel() for p in params if p.dim() == 2 and p is not embedding)
        if getattr(self.model, "tie_word_embeddings", False):
            matmul_params += embedding.numel()  # the tied lm head is still a matmul
        return {
            "weight_bytes": weight_bytes,
            "kv_bytes_per_token": self.page_bytes() // self.block_size,
            "num_matmul_params": matmul_params,
        }

    def shutdown(self) -> None:
        """A single-device engine has no worker processes to stop."""

    # ---- a step -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def launch(self, host: HostBatch, copy_results: bool = True) -> LaunchedStep:
        """Queue one step on the device and start copying its results back; returns without waiting.

        Every tensor-parallel rank runs this, samples included (sampling is deterministic, so all ranks hold the
        same tokens for the next step's inputs); only the driver copies results back (``copy_results``)."""
        self.copy_pages(host.page_copies)
        batch = to_forward_batch(host, self.stager)
        step = LaunchedStep.for_batch(host)
        out = self.forward(batch)
        if batch.prompt is not None:
            ids, values = self.score_prompt(batch, out.hidden)
            if copy_results:
                step.prompt_ids, step.prompt_values = self._to_host(ids), self._to_host(values)
        if batch.sampling is not None and batch.sampling.grammar_rows is not None and batch.sampling.grammar_bitmask is None:
            step.unsampled = (out.logits, batch.sampling)  # the grammar's bitmask comes later: ``sample``
            return step
        if batch.sampling is not None:
            self._sample(step, out.logits, batch.sampling, copy_results)
        self._record(step)
        return step

    @torch.inference_mode()
    def sample(self, step: LaunchedStep, grammar_bitmask: np.ndarray) -> None:
        """Sample a step launched without its grammar bitmask. The forward is already queued, so the host made
        the bitmask (after the previous step's tokens came back) while the device ran it."""
        assert step.unsampled is not None, "this step was sampled at launch"
        (logits, sampling), step.unsampled = step.unsampled, None
        # through the stager's reused pinned buffers: a fresh pinned allocation could wait for the device
        sampling.grammar_bitmask = self.stager.transfer({"bitmask": grammar_bitmask})["bitmask"]
        self._sample(step, logits, sampling, copy_results=True)
        self._record(step)

    def _sample(self, step: LaunchedStep, logits: torch.Tensor, sampling: Any, copy_results: bool) -> None:
        sampled = self.sampler(logits, sampling)
        self.last_sampled = sampled.token_ids
        if copy_results:
            step.token_ids = self._tokens_to_host(sampled.token_ids)
            if sampled.logprobs is not None:
                step.logprobs = (self._to_host(sampled.logprob_ids), self._to_host(sampled.logprobs))

    def _record(self, step: LaunchedStep) -> None:
        if self.device.type == "cuda":
            step.event = torch.cuda.Event()
            step.event.record()

    def score_prompt(self, batch: ForwardBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logprobs of the prompt tokens this step scores (echo / prompt_logprobs): each scored token's logprob
        followed by the row's top-N (N: the most any request asks), from their rows' hidden states."""
        logits = self.model.compute_logits(hidden[batch.prompt_rows])
        return top_logprobs(logits.float().log_softmax(dim=-1), batch.prompt_targets, batch.prompt.top_n)

    def collect(self, step: LaunchedStep) -> ModelOutput:
        """Wait for a launched step and turn its results into lists."""
        if step.event is not None:
            start = time.perf_counter()
            step.event.synchronize()
            self._wait_time += time.perf_counter() - start
        return step.to_model_output()

    def take_wait_time(self) -> float:
        """Seconds spent blocked on the device since the last call (so the engine can report host time)."""
        wait, self._wait_time = self._wait_time, 0.0
        return wait

    def _tokens_to_host(self, tokens: torch.Tensor) -> torch.Tensor:
        """Into the next of a few reused pinned buffers (a slot returns only after its step was collected)."""
        if self.device.type != "cuda":
            return tokens
        if not self._token_slots:
            self._token_slots = [torch.empty(self.config.max_num_seqs, dtype=torch.int64, pin_memory=True)
                                 for _ in range(3)]
        slot = self._token_slots[self._next_token_slot][: tokens.shape[0]]
        self._next_token_slot = (self._next_token_slot + 1) % len(self._token_slots)
        return slot.copy_(tokens, non_blocking=True)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def forward(self, batch: ForwardBatch, stage_input: StageTensors | None = None) -> ForwardOutput:
        """Logits of the rows to sample (none if no row samples), hidden states of every row, or on a pipeline
        stage before the last, what the next stage gets."""
        if batch.pending_rows is not None:
            batch.input_ids[batch.pending_rows] = self.last_sampled[batch.pending_sources]
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch, stage_input)
        self.backend.prepare(batch.meta)
        args = [batch.input_ids, batch.positions] + ([stage_input] if self.receives_stage_input else [])
        with set_forward_context(batch.meta, self.backend):
            hidden = self.model(*args)
        if isinstance(hidden, StageTensors):
            return ForwardOutput(to_next_stage=hidden)
        logits = self.model.compute_logits(hidden[batch.logits_indices]) if batch.sampling is not None else None
        return ForwardOutput(logits=logits, hidden=hidden)
