"""Executors run the model: ``ModelRunner`` on one device, ``ParallelExecutor`` over tensor and pipeline ranks."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanovllm.config import EngineConfig
    from nanovllm.executor.base import Executor


def make_executor(config: EngineConfig, model_path: str) -> Executor:
    """One device, or tensor/pipeline-parallel ranks, as the config asks."""
    from nanovllm.distributed.groups import get_parallel_groups

    if get_parallel_groups() is not None:  # layers read the process's one tensor-parallel group
        raise RuntimeError("this process already runs a parallel engine; call its shutdown() first")
    if config.tensor_parallel_size * config.pipeline_parallel_size > 1:
        from nanovllm.executor.parallel_executor import ParallelExecutor

        return ParallelExecutor(config, model_path)
    from nanovllm.executor.model_runner import ModelRunner

    return ModelRunner(config, model_path)
