"""The synchronous engine: the input processor, the engine core and the output processor in one process."""
from __future__ import annotations

import dataclasses

from nanovllm.config import EngineConfig
from nanovllm.engine.engine_core import EngineCore
from nanovllm.engine.input_processor import InputProcessor, ProcessedRequest, Prompt
from nanovllm.engine.model_files import prepare_model_files
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.executor import make_executor
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        files = prepare_model_files(config, weights=True)
        self.config = config
        self.tokenizer = files.tokenizer
        self.core = EngineCore(config, make_executor(config, files.model_path), load_tokenizer=lambda: self.tokenizer)
        self.input_processor = InputProcessor(config, self.tokenizer, files.eos_token_ids, self.core.num_kv_pages)
        self.output_processor = OutputProcessor(self.tokenizer)

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, stream: bool = False
    ) -> None:
        """Validate and queue one request; raises ``ValueError`` before anything is queued."""
        self.add_processed(self.input_processor.process(request_id, prompt, params), stream)

    def add_processed(self, request: ProcessedRequest, stream: bool = False) -> None:
        self.output_processor.add_request(request, stream)
        for spec in request.engine_requests:
            self.core.add_request(spec)

    def abort_request(self, request_id: str) -> None:
        for child in self.output_processor.abort_request(request_id):
            self.core.abort_request(child)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def shutdown(self) -> None:
        self.core.executor.shutdown()

    def stats(self) -> dict[str, float]:
        stats = dataclasses.asdict(self.core.stats)
        stats.update(kv_usage=self.core.kv_usage(), num_running=self.core.scheduler.num_running,
                     num_waiting=self.core.scheduler.num_waiting)
        return stats

    def step(self) -> list[RequestOutput]:
        processed = self.output_processor.process(self.core.step())
        for stop in processed.stops:
            self.core.finish_request(stop.request_id, stop.stop)
        for request_id in processed.aborts:
            self.core.abort_request(request_id)
        return processed.outputs
