"""Engine arguments: one validated dataclass, spelled as in vLLM."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cuda", "cpu")
LOAD_FORMATS = ("auto", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
STRUCTURED_OUTPUTS_BACKENDS = ("xgrammar", "llguidance")
QUANTIZATIONS = ("fp8",)  # besides None: the checkpoint's own quantization_config, if any


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    # token budget of one step; the original nano-vllm's default. Each step has a fixed host cost per layer, so
    # larger prefill steps cost less host time per token; a smaller budget shortens the decode stalls they cause
    max_num_batched_tokens: int = 16384
    block_size: int = 16  # tokens per KV page
    num_kv_blocks: int | None = None  # None: sized from free memory
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 2.0  # KV pool size on CPU when num_kv_blocks is not given
    enforce_eager: bool = False  # no CUDA graphs
    async_scheduling: bool | None = None  # overlap scheduling with the device; None: on for CUDA
    load_format: str = "auto"
    # None: as the checkpoint's quantization_config says (FP8 checkpoints); "fp8": FP8 weights (a bf16/fp16
    # checkpoint is quantized at load, one scale per output channel)
    quantization: str | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    revision: str | None = None
    trust_remote_code: bool = False
    structured_outputs_backend: str = "xgrammar"  # the grammar engine of structured outputs
    # filled in by the engine once the model config is read
    hf_config: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be None or one of {list(QUANTIZATIONS)}, got {self.quantization!r}")
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("structured_outputs_backend", self.structured_outputs_backend, STRUCTURED_OUTPUTS_BACKENDS)
        _check_int("max_num_seqs", self.max_num_seqs, minimum=1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, minimum=1)
        _check_int("block_size", self.block_size, minimum=1)
        _check_int("tensor_parallel_size", self.tensor_parallel_size, minimum=1)
        _check_int("pipeline_parallel_size", self.pipeline_parallel_size, minimum=1)
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, minimum=1)
        if self.num_kv_blocks is not None:
            _check_int("num_kv_blocks", self.num_kv_blocks, minimum=1)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gib <= 0:
            raise ValueError(f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineConfig":
        """Build from ``LLM(model, **kwargs)``, rejecting unknown names with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("model", "hf_config")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s) {unknown}; known arguments: {sorted(known)}")
        return cls(model=model, **kwargs)

    def finalize(self, hf_config: Any) -> None:
        """Resolve the defaults that depend on the model's config."""
        self.hf_config = hf_config
        limit = getattr(hf_config, "max_position_embeddings", None)
        if self.max_model_len is None:
            self.max_model_len = limit or 4096
        elif limit is not None and self.max_model_len > limit:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) is larger than the model's "
                f"max_position_embeddings ({limit})"
            )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
