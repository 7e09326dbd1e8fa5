"""Engine arguments on the command line, in vLLM's spelling, shared by ``serve``, ``generate`` and ``chat``."""
from __future__ import annotations

import argparse
from typing import Any

from nanovllm.config import (
    ATTENTION_BACKENDS,
    DEVICES,
    DTYPES,
    LOAD_FORMATS,
    QUANTIZATIONS,
    STRUCTURED_OUTPUTS_BACKENDS,
)

# flag destination -> EngineConfig field (the same name everywhere, which keeps this table honest)
_ENGINE_FIELDS = (
    "tokenizer", "revision", "dtype", "device", "seed", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "block_size", "num_kv_blocks", "gpu_memory_utilization", "cpu_kv_cache_gib", "enforce_eager", "load_format",
    "enable_prefix_caching", "attention_backend", "tensor_parallel_size", "pipeline_parallel_size",
    "trust_remote_code", "structured_outputs_backend", "quantization",
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags left unset keep ``EngineConfig``'s defaults (they default to None here and are not passed on)."""
    group = parser.add_argument_group("engine")
    group.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the model's)")
    group.add_argument("--revision", default=None, help="hub revision of the model")
    group.add_argument("--dtype", choices=DTYPES, default=None)
    group.add_argument("--device", choices=DEVICES, default=None)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--max-num-seqs", type=int, default=None)
    group.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="token budget of one step (smaller: prefills are chunked finer)")
    group.add_argument("--block-size", type=int, default=None, help="tokens per KV page")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in pages (default: sized)")
    group.add_argument("--gpu-memory-utilization", type=float, default=None)
    group.add_argument("--cpu-kv-cache-gib", type=float, default=None)
    group.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    group.add_argument("--load-format", choices=LOAD_FORMATS, default=None)
    group.add_argument("--quantization", "-q", choices=QUANTIZATIONS, default=None,
                       help="fp8: FP8 weights, a bf16 checkpoint quantized at load (default: as the checkpoint's "
                            "quantization_config says)")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=None)
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=None)
    group.add_argument("--pipeline-parallel-size", "-pp", type=int, default=None)
    group.add_argument("--trust-remote-code", action="store_true", default=None)
    group.add_argument("--structured-outputs-backend", choices=STRUCTURED_OUTPUTS_BACKENDS, default=None,
                       help="grammar engine of structured outputs and forced tool calls (default: xgrammar)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _ENGINE_FIELDS if getattr(args, name, None) is not None}
