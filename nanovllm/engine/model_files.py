"""What a front end reads from a model before it can take requests: where it is, its config, its tokenizer and
which tokens end a sequence."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.loader import is_gguf, load_hf_config, resolve_model_path

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True)
class ModelFiles:
    model_path: str  # a local directory
    tokenizer: Any  # None for a dummy-weight model without tokenizer files (token-id prompts only)
    eos_token_ids: frozenset[int]


def prepare_model_files(config: EngineConfig, weights: bool) -> ModelFiles:
    """Resolve the model (``weights``: fetch its weights too, else configs and tokenizer files only), finish the
    engine config from the model's, and load the tokenizer."""
    start = time.perf_counter()
    model_path = resolve_model_path(config.model, config.revision, weights=weights and config.load_format != "dummy")
    hf_config = load_hf_config(model_path, config.trust_remote_code)
    config.finalize(hf_config)
    tokenizer = load_tokenizer(config, model_path)
    eos_ids = eos_token_ids(hf_config, load_generation_config(model_path), tokenizer)
    logger.info("config: %s (%s), max_model_len %d, %s, read in %.2f s", model_path,
                ",".join(getattr(hf_config, "architectures", None) or ["?"]), config.max_model_len,
                f"tokenizer of {len(tokenizer)} tokens" if tokenizer is not None else "no tokenizer",
                time.perf_counter() - start)
    return ModelFiles(model_path, tokenizer, eos_ids)


def load_tokenizer(config: EngineConfig, model_path: str) -> Any:
    """The tokenizer, or None when a dummy-weight model directory has none (token-id prompts still work)."""
    from transformers import AutoTokenizer

    if config.tokenizer is None and is_gguf(model_path):  # the file carries its tokenizer and chat template
        from nanovllm.loader.gguf import load_tokenizer as load_gguf_tokenizer

        return load_gguf_tokenizer(model_path, config.trust_remote_code)
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
    """The ``GenerationConfig`` of a local model, or None where it has no ``generation_config.json`` (a GGUF file
    keeps its end-of-sequence ids in its config and tokenizer). Only the local file is read, never the hub; one that
    is there but cannot be read is an error naming it, rather than a model that silently loses its eos ids."""
    path = os.path.join(model_path, _GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:  # transformers says invalid JSON with an OSError
        raise ValueError(f"cannot read {path}: {exc}") from None


def eos_token_ids(hf_config: Any, generation_config: Any, tokenizer: Any) -> frozenset[int]:
    """Every id any of the three sources calls end-of-sequence."""
    ids: set[int] = set()
    for source in (generation_config, hf_config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
