"""A step's inputs: ``HostBatch`` (flat arrays on the host, what the engine hands the executor and tensor-parallel
ranks receive) and ``ForwardBatch`` (the same on the device, with the attention metadata a forward reads)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from nanovllm.executor.staging import HostStager
from nanovllm.layers.attention.metadata import AttentionMetadata
from nanovllm.layers.sampler import ConditionalBans, Penalties, SamplingBatch


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without stalling the host. From pageable memory CUDA first waits for the stream to drain, which
    would undo overlap scheduling; from pinned memory the copy is queued like a kernel."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class PromptSpan:
    """Prompt tokens of one request scored this step (echo / prompt_logprobs): ``num_tokens`` consecutive rows of
    ``PromptScoring.rows``, each with the ``top_n`` most likely tokens beside it."""

    request_id: str
    num_tokens: int
    top_n: int


@dataclass
class PromptScoring:
    rows: np.ndarray  # int64: row p - 1 scores prompt token p
    targets: np.ndarray  # int64: those prompt tokens
    spans: list[PromptSpan]

    @property
    def top_n(self) -> int:
        return max(span.top_n for span in self.spans)


@dataclass
class HostPenalties:
    presence: np.ndarray  # [B] float32
    frequency: np.ndarray  # [B] float32
    repetition: np.ndarray  # [B] float32
    output_counts: np.ndarray  # [B, V] float32
    seen: np.ndarray  # [B, V] bool


@dataclass
class HostSampling:
    """Per sampled row (in the order of ``HostBatch.logits_indices``): settings, and flags picking the code path."""

    temperatures: np.ndarray  # float32; 0 for greedy rows
    top_ks: np.ndarray  # int64; the vocabulary size when disabled
    top_ps: np.ndarray  # float32
    min_ps: np.ndarray  # float32
    keys: np.ndarray  # int64 noise keys, from (request seed, output index)
    all_greedy: bool
    use_top_k_top_p: bool
    use_min_p: bool
    row_logprobs: list[int | None]  # top logprobs each row asks for (None: no logprobs)
    # (row, token) pairs that may not be sampled: stop tokens short of min_tokens, bad words' last tokens
    banned_rows: np.ndarray | None = None
    banned_tokens: np.ndarray | None = None
    penalties: HostPenalties | None = None
    # The optional arrays below exist only in batches where some row uses logit_bias, allowed_token_ids or
    # bad_words. logit_bias: (row, token, bias) triples.
    bias_rows: np.ndarray | None = None  # int64
    bias_tokens: np.ndarray | None = None  # int64
    bias_values: np.ndarray | None = None  # float32
    # allowed_token_ids: the rows restricted, and (row, token) pairs of what each may sample
    restricted_rows: np.ndarray | None = None  # int64
    allowed_rows: np.ndarray | None = None  # int64
    allowed_tokens: np.ndarray | None = None  # int64
    # bad words whose prefix ends with a token still on the device: ban ``ban_if_tokens`` in ``ban_if_rows`` where
    # the row's input token (``input_ids[ban_if_inputs]``, its newest token) is ``ban_if_after``
    ban_if_rows: np.ndarray | None = None  # int64
    ban_if_tokens: np.ndarray | None = None  # int64
    ban_if_after: np.ndarray | None = None  # int64
    ban_if_inputs: np.ndarray | None = None  # int64
    # structured outputs: the constrained rows, and their token bitmask ([rows, vocab / 32] int32, bit t % 32 of
    # word t // 32 set where token t is allowed). Without a bitmask here, it comes after the launch (``sample``):
    # the grammar needs the previous step's tokens, which are still being sampled
    grammar_rows: np.ndarray | None = None  # int64
    grammar_bitmask: np.ndarray | None = None

    @property
    def num_logprobs(self) -> int:
        """The most top logprobs any row asks for; -1: no row wants logprobs."""
        return max((n for n in self.row_logprobs if n is not None), default=-1)


@dataclass
class HostBatch:
    """A step's inputs on the host: plain arrays and numbers, cheap to pickle."""

    input_ids: np.ndarray  # [num_tokens] int64 (a placeholder where the token is still on the device)
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    query_start_loc: np.ndarray  # [batch + 1] int32
    seq_lens: np.ndarray  # [batch] int32
    block_tables: np.ndarray  # [batch, max_pages] int32
    logits_indices: np.ndarray  # [num_sampled] int32: the rows whose logits are sampled
    query_lens: list[int]
    decode_order: np.ndarray | None = None  # decode-only batches: rows longest first
    # overlap scheduling: input rows whose token is still on the device, and that token's row in the last samples
    pending_rows: np.ndarray | None = None
    pending_sources: np.ndarray | None = None
    sampling: HostSampling | None = None  # None: no row samples
    prompt: PromptScoring | None = None  # None: no prompt token is scored
    page_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) copy-on-write before the forward

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_sampled(self) -> int:
        return self.logits_indices.shape[0] if self.sampling is not None else 0


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled]
    sampling: SamplingBatch | None
    pending_rows: torch.Tensor | None = None
    pending_sources: torch.Tensor | None = None
    prompt_rows: torch.Tensor | None = None
    prompt_targets: torch.Tensor | None = None
    prompt: PromptScoring | None = None


def _arrays(value: object) -> dict[str, np.ndarray]:
    """Every array field of a host dataclass and of those nested in it, by field name (the names are unique)."""
    found: dict[str, np.ndarray] = {}
    for f in dataclasses.fields(value):  # type: ignore[arg-type]
        item = getattr(value, f.name)
        if isinstance(item, np.ndarray):
            found[f.name] = item
        elif dataclasses.is_dataclass(item):
            found.update(_arrays(item))
    return found


def to_forward_batch(host: HostBatch, stager: HostStager) -> ForwardBatch:
    """All of the step's arrays go to the device in one copy; this names them again on the other side."""
    on_device = stager.transfer(_arrays(host))
    seq_lens = host.seq_lens.tolist()
    meta = AttentionMetadata(
        slot_mapping=on_device["slot_mapping"],
        query_start_loc=on_device["query_start_loc"],
        seq_lens=on_device["seq_lens"],
        block_tables=on_device["block_tables"],
        max_query_len=max(host.query_lens),
        max_seq_len=max(seq_lens),
        decode_order=on_device.get("decode_order"),
        query_lens_cpu=host.query_lens,
        seq_lens_cpu=seq_lens,
    )
    sampling = None
    if host.sampling is not None:
        flags = host.sampling
        sampling = SamplingBatch(
            temperatures=on_device["temperatures"], top_ks=on_device["top_ks"], top_ps=on_device["top_ps"],
            min_ps=on_device["min_ps"], keys=on_device["keys"], all_greedy=flags.all_greedy,
            use_top_k_top_p=flags.use_top_k_top_p, use_min_p=flags.use_min_p, num_logprobs=flags.num_logprobs,
        )
        if flags.banned_rows is not None:
            sampling.banned = (on_device["banned_rows"], on_device["banned_tokens"])
        if flags.bias_rows is not None:
            sampling.logit_bias = (on_device["bias_rows"], on_device["bias_tokens"], on_device["bias_values"])
        if flags.restricted_rows is not None:
            sampling.allowed = (on_device["restricted_rows"], on_device["allowed_rows"], on_device["allowed_tokens"])
        if flags.ban_if_rows is not None:
            # input_ids is the forward's own tensor: the forward fills in the tokens still on the device before
            # the sampler reads it
            sampling.conditional_bans = ConditionalBans(
                rows=on_device["ban_if_rows"], tokens=on_device["ban_if_tokens"], after=on_device["ban_if_after"],
                input_ids=on_device["input_ids"], inputs=on_device["ban_if_inputs"],
            )
        if flags.grammar_rows is not None:
            sampling.grammar_rows, sampling.grammar_bitmask = on_device["grammar_rows"], on_device.get("grammar_bitmask")
        if flags.penalties is not None:
            sampling.penalties = Penalties(
                presence=on_device["presence"], frequency=on_device["frequency"],
                repetition=on_device["repetition"], output_counts=on_device["output_counts"],
                seen=on_device["seen"],
            )
    return ForwardBatch(
        on_device["input_ids"], on_device["positions"], meta, on_device["logits_indices"], sampling,
        pending_rows=on_device.get("pending_rows"), pending_sources=on_device.get("pending_sources"),
        prompt_rows=on_device.get("rows"), prompt_targets=on_device.get("targets"), prompt=host.prompt,
    )
