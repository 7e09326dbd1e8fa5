"""``LLM``: the offline batch front end, as in vLLM and the original nano-vllm."""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from nanovllm.config import EngineConfig
from nanovllm.engine.input_processor import Prompt
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    def __init__(self, model: str, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or as token ids
        return self._generate(list(prompts), sampling_params, use_tqdm)

    def _generate(
        self, prompts: list[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool, texts: list[str] | None = None,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"sampling_params must be one SamplingParams or one per prompt: got {len(sampling_params)} "
                f"for {len(prompts)} prompts"
            )
        # validate everything before queueing anything, so a bad prompt leaves the engine untouched
        intake = self.engine.input_processor
        texts = texts or [None] * len(prompts)  # type: ignore[list-item]
        requests = [intake.process(str(next(self._ids)), p, params, prompt_text=text)
                    for p, params, text in zip(prompts, sampling_params, texts)]
        for request in requests:
            self.engine.add_processed(request)
        return self._run([request.request_id for request in requests], use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        stats = self.engine.core.stats
        start, prompt_start, gen_start = time.perf_counter(), stats.num_prompt_tokens, stats.num_generated_tokens
        try:
            while self.engine.has_unfinished():
                outputs = self.engine.step()
                if self.engine.core.is_stalled():
                    self.engine.core.wait_for_grammars(timeout=0.01)
                for output in outputs:
                    results[output.request_id] = output
                    bar.update(1)
                    for failed in (c for c in output.outputs if c.finish_reason == "error"):
                        logger.error("request %s failed: %s", output.request_id, failed.stop_reason)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(
                    prefill=f"{(stats.num_prompt_tokens - prompt_start) / elapsed:.0f} tok/s",
                    decode=f"{(stats.num_generated_tokens - gen_start) / elapsed:.0f} tok/s",
                    refresh=False,
                )
        except BaseException:
            for request_id in request_ids:  # leave no request (and no page) behind
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [results[request_id] for request_id in request_ids]

    def shutdown(self) -> None:
        """Stop the engine's worker processes, if it has any (tensor parallelism). Also runs at exit."""
        self.engine.shutdown()

    def stats(self) -> dict[str, float]:
        """Counters since start-up: steps, prompt and generated tokens, preemptions, prefix-cache use, host time."""
        return self.engine.stats()

    def model_info(self) -> dict[str, int]:
        """Sizes that bound speed: weight bytes read per step, KV bytes per token, matmul parameters."""
        return self.engine.core.executor.model_info()

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        intake = self.engine.input_processor
        texts = [intake.render_chat_text(c, add_generation_prompt, chat_template_kwargs)  # type: ignore[arg-type]
                 for c in conversations]
        prompts: list[Prompt] = [intake.encode(text, add_special_tokens=False) for text in texts]
        return self._generate(prompts, sampling_params, use_tqdm, texts)
