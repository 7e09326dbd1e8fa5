"""Where a model comes from: a checkpoint directory, a GGUF file (or a directory holding one), or a Hugging Face hub
id, found offline first; and its config."""
from __future__ import annotations

import glob
import logging
import os
import re
from typing import Any

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf") and os.path.isfile(path)


def resolve_model_path(model: str, revision: str | None = None, weights: bool = True) -> str:
    """A local checkpoint directory or .gguf file (a directory with no other weights than one .gguf means that
    file); otherwise a hub id, from the local hub cache or downloaded. ``weights``: fetch the weights too."""
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model {model!r} is a file, but not a .gguf file; pass a checkpoint directory or a "
                             "GGUF file")
        return path
    if os.path.isdir(path):
        return _single_gguf(path) or path
    if model.endswith(".gguf") or not _HUB_ID.fullmatch(model) or model.startswith("."):
        raise ValueError(f"model path {model!r} does not exist")
    return _from_hub(model, revision, weights)


def _single_gguf(directory: str) -> str | None:
    files = sorted(glob.glob(os.path.join(directory, "*.gguf")))
    if not files or os.path.exists(os.path.join(directory, "config.json")):
        return None
    if len(files) > 1:
        raise ValueError(f"{directory} holds several GGUF files ({', '.join(os.path.basename(f) for f in files)}); "
                         "pass the one to load")
    return files[0]


def _from_hub(model: str, revision: str | None, weights: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    patterns = ["*.json", "*.txt", "*.model", "*.jinja", "*.safetensors"] if weights else ["*.json", "*.txt",
                                                                                            "*.model", "*.jinja"]
    try:
        return snapshot_download(model, revision=revision, allow_patterns=patterns)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise ValueError(f"model {model!r} is not in the local Hugging Face cache and the hub cannot be reached "
                         f"({type(exc).__name__}); pass a checkpoint directory or a .gguf file instead") from None
    except RepositoryNotFoundError:
        raise ValueError(f"model {model!r} is neither a local path nor a model on the Hugging Face hub") from None


def load_hf_config(path: str, trust_remote_code: bool = False) -> Any:
    if is_gguf(path):
        from nanovllm.loader.gguf import load_config

        return load_config(path)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
