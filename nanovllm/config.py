"""Engine arguments: one validated dataclass, spelled as in vLLM."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# vLLM's spellings; "half" and "float" are aliases that __post_init__ turns into "float16" and "float32"
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
DEVICES = ("auto", "cuda", "cpu")
LOAD_FORMATS = ("auto", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
STRUCTURED_OUTPUTS_BACKENDS = ("xgrammar", "llguidance")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
QUANTIZATIONS = ("fp8",)  # besides None: the checkpoint's own quantization_config, if any


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A field together with what its command-line flag needs (``entrypoints/engine_args.py`` reads it): the help,
    the allowed values, extra option strings (``-tp``; vLLM's other names). The flag's name, type and default are
    the field's own. A default of None means "decided later"; ``help`` says by what."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


@dataclass
class EngineConfig:
    model: str = field(metadata={"help": "checkpoint directory, GGUF file or Hugging Face hub id", "flag": False})
    tokenizer: str | None = option(None, "tokenizer name or path (default: the model's)")
    revision: str | None = option(None, "hub revision (branch, tag or commit) of the model")
    dtype: str = option("auto", "weights and activations: auto (the checkpoint's half type on CUDA, float32 on "
                                "CPU), half = float16, bfloat16, float = float32", choices=DTYPES)
    device: str = option("auto", "auto: CUDA when available, else CPU", choices=DEVICES)
    seed: int = option(0, "seed of the engine's random state (requests without a seed draw theirs from it)")
    max_model_len: int | None = option(None, "longest prompt + output in tokens (default: the model's "
                                             "max_position_embeddings)")
    max_num_seqs: int = option(256, "most requests running at once")
    # token budget of one step; the original nano-vllm's default. Each step has a fixed host cost per layer, so
    # larger prefill steps cost less host time per token; a smaller budget shortens the decode stalls they cause
    max_num_batched_tokens: int = option(16384, "token budget of one step (smaller: prefills are chunked finer)")
    block_size: int = option(16, "tokens per KV page")
    num_kv_blocks: int | None = option(None, "KV pool size in pages (default: sized from free memory)",
                                       aliases=("--num-gpu-blocks-override",))
    gpu_memory_utilization: float = option(0.9, "share of the GPU's memory the engine may use (weights, "
                                                "activations, KV pool)")
    cpu_kv_cache_gib: float = option(2.0, "KV pool size in GiB on CPU, when --num-kv-blocks is not given")
    enforce_eager: bool = option(False, "no CUDA graphs (and no compiled fast path)")
    async_scheduling: bool | None = option(None, "overlap scheduling of the next step with the device's work on "
                                                 "this one (default: on for CUDA)")
    load_format: str = option("auto", "auto: the checkpoint's files; dummy: random weights from the config alone",
                              choices=LOAD_FORMATS)
    quantization: str | None = option(None, "fp8: FP8 weights, a bf16/fp16 checkpoint quantized at load, one scale "
                                            "per output channel (default: as the checkpoint's quantization_config "
                                            "says)", choices=QUANTIZATIONS, aliases=("-q",))
    enable_prefix_caching: bool = option(True, "reuse the KV pages of shared prompt prefixes (radix cache)")
    attention_backend: str = option("auto", "auto: triton on CUDA, torch elsewhere", choices=ATTENTION_BACKENDS)
    tensor_parallel_size: int = option(1, "split every layer over this many GPUs", aliases=("-tp",))
    pipeline_parallel_size: int = option(1, "split the stack of layers into this many stages", aliases=("-pp",))
    trust_remote_code: bool = option(False, "run the model repository's own Python code (configs, tokenizers)")
    structured_outputs_backend: str = option("xgrammar", "grammar engine of structured outputs and forced tool calls",
                                             choices=STRUCTURED_OUTPUTS_BACKENDS)
    kv_cache_dtype: str = option("auto", "KV cache dtype: auto (the model's) or FP8 (fp8 = fp8_e4m3, fp8_e5m2), "
                                         "half the bytes per token of bf16", choices=KV_CACHE_DTYPES)
    calculate_kv_scales: bool = option(False, "measure the FP8 KV scales on the first prefill (default: the "
                                              "checkpoint's, or 1.0)")
    # filled in by the engine once the model config is read
    hf_config: Any = field(default=None, repr=False, metadata={"flag": False})

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        _check_choice("device", self.device, DEVICES)
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be None or one of {list(QUANTIZATIONS)}, got {self.quantization!r}")
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("structured_outputs_backend", self.structured_outputs_backend, STRUCTURED_OUTPUTS_BACKENDS)
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if self.calculate_kv_scales and self.kv_cache_dtype == "auto":
            raise ValueError("calculate_kv_scales needs an FP8 kv_cache_dtype ('fp8', 'fp8_e4m3' or 'fp8_e5m2')")
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
