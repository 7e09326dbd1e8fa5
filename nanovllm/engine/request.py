"""One request's state as the engine core sees it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanovllm.engine.messages import EngineRequest
from nanovllm.sampling_params import SamplingParams


# Stands in token_ids for a token that is sampled but not yet back on the host (overlap scheduling).
PLACEHOLDER = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no pages (new or preempted)
    RUNNING = "running"  # holds pages; prefilling in chunks or decoding
    FINISHED_STOPPED = "stop"  # eos, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # failed inside the engine; the others go on

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(eq=False)
class Request:
    """``token_ids`` is the prompt followed by the tokens generated so far.

    ``num_computed_tokens`` of them have KV in ``page_table``; the scheduler advances it when it schedules a chunk,
    so between schedule and update it counts the tokens being computed this step. A chunk that samples appends a
    ``PLACEHOLDER`` at schedule time, filled in when its step's results arrive: the next step can then be
    scheduled (and its input taken from the sampled tensor on the device) before this one finishes.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never None here
    sampling_seed: int  # resolved: the user's seed or one drawn by the engine
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0
    page_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache at first admission; -1 before
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token or string; with FINISHED_ERROR, the error
    prefix_node: Any = None  # the prefix-cache node this request has locked, if any
    prompt_logprobs: list[dict[int, float]] = field(default_factory=list)  # for prompt positions 1.. (echo)
    prompt_logprobs_sent: bool = False
    sample_row: int = -1  # row of this request's last sampled token in its step's samples (on the device)
    grammar: Any = None  # structured outputs: a GrammarState (compiling, then its matcher)
    in_flight: bool = False  # in a launched micro-batch not yet collected (pipeline parallelism)
    # for metrics, on the core's clock: queued (made here, in the core), first scheduled (preemptions do not reset it)
    queued_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    timings_sent: bool = False  # the front end has them (they go with the first output)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self._page_array = np.empty(0, dtype=np.int32)

    @classmethod
    def from_spec(cls, spec: EngineRequest) -> "Request":
        return cls(spec.request_id, list(spec.prompt_token_ids), spec.sampling_params, spec.max_tokens,
                   spec.sampling_seed, spec.eos_token_ids, spec.arrival_time)

    def set_page_table(self, pages: list[int]) -> None:
        """Replace the page table (release or prefix match); appending to it needs no call."""
        self.page_table = pages
        self._page_array = np.empty(0, dtype=np.int32)

    def page_array(self) -> np.ndarray:
        """``page_table`` as an int32 array, rebuilt only when the table changed length (pages are only ever
        appended or all released), so building a batch copies arrays instead of converting lists."""
        if len(self._page_array) != len(self.page_table):
            self._page_array = np.asarray(self.page_table, dtype=np.int32)
        return self._page_array

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is not computed yet (1 while decoding)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        status = self.status  # identity checks: this runs for every request on every step
        return status is not RequestStatus.RUNNING and status is not RequestStatus.WAITING
