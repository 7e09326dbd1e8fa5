"""The server's default sampling values, from the model's ``generation_config.json`` as vLLM takes them.

``--generation-config``: ``auto`` reads the model's file, ``vllm`` reads none (the neutral defaults: temperature 1,
top_p 1, no top-k, ...), a folder reads that folder's ``generation_config.json``. Of the file only the sampling
values count: ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` and ``max_new_tokens``
(a request's ``max_tokens``). ``--override-generation-config`` (JSON) sets or replaces them. A request's own value
always wins; these only fill in what a request leaves out. They are checked as ``SamplingParams`` before the model
loads, so a bad one fails the start, naming where it came from.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

GENERATION_CONFIG_MODES = ("auto", "vllm")
# generation_config.json's names of the sampling values (vLLM takes the same ones)
SAMPLING_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")
_FILE = "generation_config.json"


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``--override-generation-config``'s JSON object, keys checked against ``SAMPLING_KEYS``."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--override-generation-config must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--override-generation-config must be a JSON object, got {text!r}")
    unknown = sorted(set(value) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"--override-generation-config: unknown key(s) {unknown}; known: {list(SAMPLING_KEYS)}")
    return value


def default_sampling(generation_config: str, model_path: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments (``max_tokens``, not ``max_new_tokens``) for what requests leave out."""
    if generation_config == "vllm":
        values, source = {}, "vLLM's defaults"
    elif generation_config == "auto":
        values, source = _read(model_path, required=False), f"the model's {_FILE}"
    else:
        values, source = _read(os.path.expanduser(generation_config), required=True), generation_config
    values = {key: values[key] for key in SAMPLING_KEYS if values.get(key) is not None}
    if overrides:
        values.update({k: v for k, v in overrides.items() if v is not None})
        source += " and --override-generation-config"
    defaults = {("max_tokens" if key == "max_new_tokens" else key): value for key, value in values.items()}
    try:
        params = SamplingParams(**defaults)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"default sampling parameters from {source}: {exc}") from None
    defaults = {key: getattr(params, key) for key in defaults}  # as SamplingParams normalizes them (top_k 0 -> -1)
    if defaults:
        logger.info("default sampling parameters from %s: %s (a request's own values win; "
                    "--generation-config vllm leaves them out)", source, defaults)
    return defaults


def _read(folder: str, required: bool) -> dict[str, Any]:
    """The generation config's values; none when the model has no file (a GGUF file, or a checkpoint without one),
    unless the folder was named on purpose."""
    from nanovllm.engine.model_files import load_generation_config  # (imports torch: not before the port is bound)

    config = load_generation_config(folder)
    if config is None and required:
        raise ValueError(f"--generation-config: there is no {_FILE} in {folder!r}")
    return {} if config is None else config.to_diff_dict()
