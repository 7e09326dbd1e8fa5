"""nano-vLLM: a small, readable LLM inference engine."""
from typing import TYPE_CHECKING, Any

from nanovllm.version import __version__

if TYPE_CHECKING:
    from nanovllm.llm import LLM
    from nanovllm.outputs import CompletionOutput, RequestOutput
    from nanovllm.sampling_params import SamplingParams

_PUBLIC = {"LLM": "nanovllm.llm", "SamplingParams": "nanovllm.sampling_params",
           "RequestOutput": "nanovllm.outputs", "CompletionOutput": "nanovllm.outputs"}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    """The public names load on first use, so that ``nanovllm --help`` does not wait for torch."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)
