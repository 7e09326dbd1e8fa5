"""From a model name or path to loaded parameters."""
from nanovllm.loader.source import is_gguf, load_hf_config, resolve_model_path
from nanovllm.loader.weights import init_dummy_weights, load_weights, safetensors_files

__all__ = ["init_dummy_weights", "is_gguf", "load_hf_config", "load_weights", "resolve_model_path",
           "safetensors_files"]
