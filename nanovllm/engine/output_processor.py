"""Front-end bookkeeping: engine-core token outputs in, user-facing ``RequestOutput``s out.

A user request with ``n`` samples is ``n`` engine requests (``{id}#{i}``) gathered back into one output here.
Stop strings are found here, after detokenization; the engine core is then told to finish that request. A sample
that fails (in the core, or here) ends its whole request with finish_reason "error"; its other samples are aborted.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.input_processor import ProcessedRequest, sample_request_id
from nanovllm.engine.messages import EngineCoreOutput, StopString
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput]  # to deliver: every touched request when streaming, else only finished ones
    stops: list[StopString] = field(default_factory=list)  # stop strings found: the core must finish these
    aborts: list[str] = field(default_factory=list)  # engine requests to abort: siblings of a failed sample


@dataclass
class _Completion:
    output: CompletionOutput
    detokenizer: IncrementalDetokenizer | None
    sent_text: int = 0  # characters and tokens already streamed
    sent_tokens: int = 0
    sent_finish: bool = False


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    completions: list[_Completion]
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_finished: int = 0

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.completions)


class OutputProcessor:
    def __init__(self, tokenizer: Any, always_incremental: bool = False) -> None:
        self.tokenizer = tokenizer
        # a server detokenizes every request the same way, so a streamed text equals the non-streamed one
        self.always_incremental = always_incremental
        self.states: dict[str, _RequestState] = {}
        self.child_to_parent: dict[str, tuple[str, int]] = {}

    def add_request(self, request: ProcessedRequest, stream: bool) -> None:
        request_id, params, prompt_token_ids = request.request_id, request.sampling_params, request.prompt_token_ids
        taken = [r.request_id for r in request.engine_requests if r.request_id in self.child_to_parent]
        if request_id in self.states or taken:  # ("a#0" is sample 0 of "a", so it may not be a request of its own)
            raise ValueError(f"request_id {request_id!r} is already in use")
        # incremental decoding costs CPU on every step, so it runs only where text is needed before the end
        incremental = self.tokenizer is not None and (stream or bool(params.stop_strings) or self.always_incremental)
        completions = [
            _Completion(
                CompletionOutput(index=i, text="", token_ids=[], logprobs=[] if params.logprobs is not None else None),
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                       params.stop_strings) if incremental else None,
            )
            for i in range(params.n)
        ]
        self.states[request_id] = _RequestState(request_id, request.prompt, prompt_token_ids, params, stream,
                                                completions)
        for i, spec in enumerate(request.engine_requests):
            self.child_to_parent[spec.request_id] = (request_id, i)

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a user request; returns the engine request ids to abort."""
        state = self.states.pop(request_id, None)
        if state is None:
            return []
        children = [sample_request_id(request_id, i, state.params.n) for i in range(state.params.n)]
        for child in children:
            self.child_to_parent.pop(child, None)
        return children

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        """Fold engine outputs in."""
        touched: dict[str, _RequestState] = {}
        result = ProcessedOutputs([])
        now = time.monotonic()
        for out in outputs:
            parent = self.child_to_parent.get(out.request_id)
            if parent is None:
                continue  # aborted by the user while the step ran
            state = self.states[parent[0]]
            try:
                self._fold(state, parent[1], out, now, result)
            except Exception as exc:  # noqa: BLE001 - a fault tied to one request (a tokenizer's, say)
                logger.exception("output processing failed for request %s", state.request_id)
                self._fail(state, f"{type(exc).__name__}: {exc}", result)
            touched[state.request_id] = state
        for state in touched.values():
            if state.stream or state.finished:
                result.outputs.append(self._make_output(state))
            if state.finished:
                self.abort_request(state.request_id)
        return result

    def _fold(self, state: _RequestState, index: int, out: EngineCoreOutput, now: float,
              result: ProcessedOutputs) -> None:
        completion = state.completions[index]
        if completion.output.finished():
            return  # finished by a stop string one step ago, or by a sibling's failure
        if out.finish_reason == "error":
            self._fail(state, str(out.stop_reason), result)
            return
        if state.first_token_time is None:
            state.first_token_time = now
        state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
        completion.output.token_ids.extend(out.new_token_ids)
        if out.logprobs is not None and completion.output.logprobs is not None:
            completion.output.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            state.prompt_logprobs = out.prompt_logprobs
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        if completion.detokenizer is not None:
            completion.detokenizer.add(out.new_token_ids)
            if finish_reason is not None:  # no more tokens will complete a held-back character: emit it
                completion.detokenizer.flush()
            completion.output.text = completion.detokenizer.text
            if completion.detokenizer.stop_reason is not None and finish_reason is None:
                finish_reason, stop_reason = "stop", completion.detokenizer.stop_reason
                result.stops.append(StopString(out.request_id, stop_reason))
        if finish_reason is not None:
            self._finish(completion, finish_reason, stop_reason, state.params)
            state.num_finished += 1

    def _fail(self, state: _RequestState, message: str, result: ProcessedOutputs) -> None:
        """The first failed sample carries the error; the unfinished others are aborted."""
        for i, completion in enumerate(state.completions):
            if completion.output.finished():
                continue
            completion.output.finish_reason, completion.output.stop_reason = "error", message
            state.num_finished += 1
            result.aborts.append(sample_request_id(state.request_id, i, state.params.n))

    def _finish(self, completion: _Completion, reason: str, stop_reason: Any, params: SamplingParams) -> None:
        out = completion.output
        out.finish_reason, out.stop_reason = reason, stop_reason
        if completion.detokenizer is None and self.tokenizer is not None:
            out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=params.skip_special_tokens)

    def _make_output(self, state: _RequestState) -> RequestOutput:
        if not state.stream:
            outputs = [c.output for c in state.completions]
        else:  # only what is new since the last delivery
            outputs = []
            for c in state.completions:
                out = c.output
                if len(out.token_ids) == c.sent_tokens and (c.sent_finish or not out.finished()):
                    continue
                new_logprobs = None if out.logprobs is None else out.logprobs[c.sent_tokens :]
                outputs.append(
                    CompletionOutput(out.index, out.text[c.sent_text :], out.token_ids[c.sent_tokens :],
                                     out.finish_reason, out.stop_reason, new_logprobs)
                )
                c.sent_text, c.sent_tokens, c.sent_finish = len(out.text), len(out.token_ids), out.finished()
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outputs,
            finished=state.finished,
            num_cached_tokens=state.num_cached_tokens,
            prompt_logprobs=state.prompt_logprobs,
            metrics=metrics,
        )
