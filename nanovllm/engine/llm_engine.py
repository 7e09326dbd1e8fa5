"""The synchronous engine: input checks, the engine core and output processing in one process."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.engine.engine_core import EngineCore
from nanovllm.engine.input_processor import InputProcessor, Prompt, eos_token_ids
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.loader import load_hf_config, resolve_model_path
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(config: EngineConfig, model_path: str) -> Any:
    """The tokenizer, or None when a dummy-weight model directory has none (token-id prompts still work)."""
    from transformers import AutoTokenizer

    source = config.tokenizer or model_path
    has_files = not os.path.isdir(source) or any(os.path.exists(os.path.join(source, f)) for f in _TOKENIZER_FILES)
    tokenizer = None
    required = config.tokenizer is not None or config.load_format != "dummy"  # dummy weights may go without
    if has_files:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError):
            if required:
                raise
    # a directory with no tokenizer files may still yield an empty stand-in; that is no tokenizer
    if tokenizer is None or len(tokenizer) <= 1:
        if required:
            raise ValueError(f"no tokenizer found at {source}; pass tokenizer=... (a directory or hub id)")
        logger.warning("no tokenizer at %s; only token-id prompts will work", source)
        return None
    return tokenizer


def load_generation_config(model_path: str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:
        return None


def make_executor(config: EngineConfig, model_path: str) -> Any:
    from nanovllm.distributed.groups import get_parallel_groups

    if get_parallel_groups() is not None:  # layers read the process's one tensor-parallel group
        raise RuntimeError("this process already runs a parallel engine; call its shutdown() first")
    if config.tensor_parallel_size * config.pipeline_parallel_size > 1:
        from nanovllm.executor.parallel_executor import ParallelExecutor

        return ParallelExecutor(config, model_path)
    from nanovllm.executor.model_runner import ModelRunner

    return ModelRunner(config, model_path)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        weights = config.load_format != "dummy"
        model_path = resolve_model_path(config.model, config.revision, weights=weights)
        hf_config = load_hf_config(model_path, config.trust_remote_code)
        config.finalize(hf_config)
        self.config = config
        self.tokenizer = load_tokenizer(config, model_path)
        eos_ids = eos_token_ids(hf_config, load_generation_config(model_path), self.tokenizer)
        self.input_processor = InputProcessor(config, self.tokenizer, eos_ids)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.core = EngineCore(config, make_executor(config, model_path))

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, stream: bool = False
    ) -> None:
        """Validate and queue one request; raises ``ValueError`` before anything is queued."""
        text, prompt_ids = self.input_processor.tokenize(prompt)
        requests = [
            self.input_processor.make_request(request_id, prompt_ids, params) for _ in range(params.n)
        ]
        for request in requests:
            self.core.check_fits(request)
        child_ids = self.output_processor.add_request(request_id, text, prompt_ids, params, stream)
        for child_id, request in zip(child_ids, requests):
            request.request_id = child_id
            if params.seed is not None and params.n > 1:
                request.sampling_seed = params.seed + int(child_id.rsplit("#", 1)[1])
            self.core.add_request(request)

    def abort_request(self, request_id: str) -> None:
        for child in self.output_processor.abort_request(request_id):
            self.core.abort_request(child)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def shutdown(self) -> None:
        """Stop worker processes (tensor parallelism); a single-process engine has nothing to stop."""
        shutdown = getattr(self.core.executor, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def stats(self) -> dict[str, float]:
        stats = dataclasses.asdict(self.core.stats)
        stats.update(kv_usage=self.core.kv_usage(), num_running=self.core.scheduler.num_running,
                     num_waiting=self.core.scheduler.num_waiting)
        return stats

    def step(self) -> list[RequestOutput]:
        outputs, to_stop = self.output_processor.process(self.core.step())
        for engine_request_id, stop_string in to_stop:
            self.core.finish_request(engine_request_id, stop_string)
        return outputs
