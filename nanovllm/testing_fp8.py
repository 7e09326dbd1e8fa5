"""Tiny FP8 checkpoints in the publishers' formats, quantized from a tiny bf16 checkpoint as their tools do.

``build_fp8_checkpoint(path, source, fmt)`` reads a checkpoint written by ``testing.build_checkpoint`` (bf16; use
``FP8_TINY`` dims: the block format needs multiples of 128) and writes its FP8 version to ``path``: the same config
plus a ``quantization_config``, the same tokenizer files, and safetensors in which every linear projection of the
decoder layers (attention, MLP, each MoE expert) is float8_e4m3fn with its scales, and everything else (embeddings,
norms, routers, the LM head) is as it was.

- ``fmt="fine-grained"``: Hugging Face fine-grained FP8: 128x128 blocks, ``weight_scale_inv = amax(block) / 448``
  (float32), ``modules_to_not_convert`` listing the LM head and the MoE routers, dynamic activations.
- ``fmt="ct-channel"`` / ``"ct-tensor"``: compressed-tensors ``float-quantized``: ``weight_scale = amax / 448`` per
  output channel (``[out, 1]``) or per tensor (``[1]``), stored in the weights' dtype as llm-compressor does and
  used rounded; activations dynamic per token, or (``static_activations``) static per tensor with ``input_scale =
  amax / 448`` of each layer's inputs over a few calibration sequences run through the bf16 model.

``not_convert``: more module names to leave unquantized (listed in the config as the format spells it).
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from nanovllm.layers.quantization.fp8_formats import FP8_MAX, quantize_block, to_fp8

FORMATS = ("fine-grained", "ct-channel", "ct-tensor")
# dims of a tiny model whose every projection splits into 128x128 blocks (also on 2 ranks with head_dim 128)
FP8_TINY: dict[str, Any] = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "head_dim": 64}
FP8_TINY_MOE: dict[str, Any] = {**FP8_TINY, "moe_intermediate_size": 128}
_ROUTERS = ("mlp.gate", "mlp.shared_expert_gate")


def build_fp8_source(path: str | Path, arch: str = "Qwen3ForCausalLM", **overrides: Any) -> str:
    """A tiny bf16 checkpoint (``testing.build_checkpoint`` with ``FP8_TINY`` dims, or ``FP8_TINY_MOE`` for a MoE
    ``arch``) whose projections and LM head are rescaled to the gain of the builder's default width (std 0.3 at
    fan-in 64, i.e. ``0.3 * sqrt(64 / fan_in)``): at width 256 the unscaled weights make a chaotic network whose
    logits swing by whole units under any perturbation, which says nothing about a quantization's accuracy."""
    from safetensors.torch import load_file, save_file

    from nanovllm.testing import build_checkpoint

    dims = FP8_TINY_MOE if "Moe" in arch else FP8_TINY
    out = Path(build_checkpoint(path, arch, dtype=torch.bfloat16, **{**dims, **overrides}))
    for file in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(file))
        for name, tensor in tensors.items():
            if is_quantized_linear(name) or name == "lm_head.weight":
                tensors[name] = (tensor.float() * math.sqrt(64 / tensor.shape[1])).to(tensor.dtype)
        save_file(tensors, str(file), metadata={"format": "pt"})
    return str(out)


def is_quantized_linear(name: str) -> bool:
    """A checkpoint tensor that the real tools quantize here: a decoder layer's projection weight."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def build_fp8_checkpoint(path: str | Path, source: str | Path, fmt: str, *, static_activations: bool = False,
                         not_convert: Iterable[str] = ()) -> str:
    from safetensors.torch import load_file, save_file

    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    if static_activations and fmt == "fine-grained":
        raise ValueError("fine-grained FP8 has dynamic activations only")
    source, out = Path(source), Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
            shutil.copy(item, out / item.name)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    config = json.loads((source / "config.json").read_text())
    skipped = set(not_convert)
    input_scales = _calibrate(source, tensors) if static_activations else {}

    quantized: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if not is_quantized_linear(name) or module in skipped:
            quantized[name] = tensor
        elif fmt == "fine-grained":
            quantized[name], quantized[f"{module}.weight_scale_inv"] = quantize_block(tensor)
        else:
            amax = tensor.float().abs().amax(dim=1, keepdim=True) if fmt == "ct-channel" else \
                tensor.float().abs().amax().reshape(1)
            scale = (amax.clamp(min=1e-12) / FP8_MAX).to(tensor.dtype)  # stored in the weights' dtype...
            quantized[name] = to_fp8(tensor, scale.float())  # ...and quantized by that rounded value
            quantized[f"{module}.weight_scale"] = scale
            if static_activations:
                quantized[f"{module}.input_scale"] = input_scales[module].to(tensor.dtype).reshape(1)
    save_file({k: v.contiguous() for k, v in quantized.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config["quantization_config"] = (_fine_grained_config(config, skipped) if fmt == "fine-grained" else
                                     _ct_config(fmt.removeprefix("ct-"), static_activations, skipped))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return str(out)


def _fine_grained_config(config: dict[str, Any], skipped: set[str]) -> dict[str, Any]:
    moe = bool(config.get("num_experts") or config.get("num_local_experts"))
    routers = [f"model.layers.{i}.{router}" for i in range(config["num_hidden_layers"]) for router in _ROUTERS] \
        if moe else []
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
            "modules_to_not_convert": ["lm_head", *routers, *sorted(skipped)]}


def _ct_args(strategy: str, dynamic: bool) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}}


def _ct_config(strategy: str, static_activations: bool, skipped: set[str]) -> dict[str, Any]:
    inputs = _ct_args("tensor", False) if static_activations else _ct_args("token", True)
    group = {"targets": ["Linear"], "weights": _ct_args(strategy, False), "input_activations": inputs,
             "output_activations": None, "format": "float-quantized"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "kv_cache_scheme": None, "sparsity_config": {},
            "global_compression_ratio": None,
            "ignore": ["lm_head", *(f"re:.*{router}$" for router in _ROUTERS), *sorted(skipped)]}


@torch.no_grad()
def _calibrate(source: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """amax / 448 of each quantized linear's inputs over a few random sequences through the bf16 model (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    names = {name.removesuffix(".weight") for name in tensors if is_quantized_linear(name)}
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if name in names and isinstance(module, torch.nn.Linear):
            def record(mod: Any, args: tuple, _out: Any, name: str = name) -> None:
                value = args[0].abs().amax()
                amax[name] = torch.maximum(amax.get(name, value), value)
            hooks.append(module.register_forward_hook(record))
    missing = names - {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if missing:
        raise ValueError(f"static activations need every quantized module to be an nn.Linear; not: {sorted(missing)}")
    generator = torch.Generator().manual_seed(0)
    model(torch.randint(0, model.config.vocab_size, (4, 48), generator=generator))
    for hook in hooks:
        hook.remove()
    return {name: value.clamp(min=1e-12) / FP8_MAX for name, value in amax.items()}
