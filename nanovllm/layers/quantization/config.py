"""Which layers hold FP8 weights, and how: read from a checkpoint's ``quantization_config`` or asked for with
``quantization="fp8"``.

Two publishers' formats are read, as they spell them:

- **Hugging Face fine-grained FP8** (``quant_method: "fp8"``): ``weight_block_size: [128, 128]``, float8_e4m3fn
  weights with float32 ``weight_scale_inv`` block scales, ``activation_scheme: "dynamic"`` (activations quantized
  per token and 128-column group), and ``modules_to_not_convert`` (module names, matched as a prefix up to a dot,
  as a dotted suffix, or as a regular expression from the start of the name).
- **compressed-tensors FP8** (``quant_method: "compressed-tensors"``, format ``float-quantized``): ``config_groups``
  whose ``weights`` are ``{num_bits: 8, type: float, strategy: tensor | channel}`` (``weight_scale``) and whose
  ``input_activations`` are dynamic per token or static per tensor (``input_scale``); ``targets`` and ``ignore``
  name modules exactly, by ``re:`` regular expression, or by class (``Linear``).

``quantization="fp8"`` on an unquantized checkpoint quantizes every linear layer's weights at load (one scale per
output channel, activations quantized per token). Anything else is a ``ValueError`` naming the field.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BLOCK = (128, 128)  # the only block shape the kernels tile
# our merged layers -> the checkpoint modules they pack, by the last name component
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SUPPORTED_QUANTIZATIONS = ("fp8",)


@dataclass(frozen=True)
class Fp8Scheme:
    """How one layer's FP8 weights are stored and its activations quantized.

    ``weight``: ``"channel"`` (scales ``[out]``), ``"tensor"`` (one scale per checkpoint module, held per channel)
    or ``"block"`` (128x128 scales). ``activation``: ``"dynamic_token"``, ``"dynamic_group"`` (per token and
    128-column group) or ``"static_tensor"`` (the checkpoint's ``input_scale``). ``serialized``: the checkpoint
    holds FP8 weights and their scales (False: they are quantized at load). ``scale_name``: the scale tensor's name
    in the checkpoint, and its parameter's name here.
    """

    weight: str
    activation: str
    serialized: bool
    scale_name: str = "weight_scale"

    @property
    def block(self) -> tuple[int, int] | None:
        return BLOCK if self.weight == "block" else None


@dataclass(frozen=True)
class QuantConfig:
    """The checkpoint's (or the engine argument's) FP8 choice. ``groups``: (targets, scheme) in order, the first
    whose targets match a module wins; ``ignore``: modules kept unquantized."""

    method: str  # "fp8" (fine-grained), "compressed-tensors" or "online"
    groups: tuple[tuple[tuple[str, ...], Fp8Scheme], ...]
    ignore: tuple[str, ...] = ()

    def scheme_for(self, names: Sequence[str]) -> Fp8Scheme | None:
        """The scheme of a linear layer whose checkpoint modules are ``names`` (one name, or the parts a merged
        layer packs), or None to keep it unquantized. Parts that disagree are an error."""
        schemes = {name: self._scheme_of(name) for name in names}
        if len(set(schemes.values())) > 1:
            raise ValueError(f"quantization_config quantizes the parts of one merged layer differently ({schemes}); "
                             "this engine runs them as one matmul")
        return next(iter(schemes.values()))

    def _scheme_of(self, name: str) -> Fp8Scheme | None:
        if any(_ignored(self.method, name, pattern) for pattern in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(_targeted(name, target) for target in targets):
                return scheme
        return None


def module_names(prefix: str) -> tuple[str, ...]:
    """A layer's own name -> the checkpoint modules it loads (the parts of a merged layer)."""
    head, _, last = prefix.rpartition(".")
    parts = FUSED_PARTS.get(last)
    if parts is None:
        return (prefix,)
    return tuple(f"{head}.{part}" if head else part for part in parts)


def _targeted(name: str, target: str) -> bool:
    if target == "Linear":  # every layer asked about is a linear layer (or a stack of expert linears)
        return True
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def _ignored(method: str, name: str, pattern: str) -> bool:
    if method == "compressed-tensors":  # exact names, "re:" regular expressions from the start, or a class
        return _targeted(name, pattern)
    # fine-grained FP8: a module, any module under it, a dotted suffix, or a regular expression up to a dot
    if name == pattern or name.startswith(pattern + ".") or name.endswith("." + pattern):
        return True
    try:
        return re.match(rf"(?:{pattern})(?:\.|$)", name) is not None
    except re.error:
        return False


# ---- resolving the engine argument against the checkpoint ---------------------------------------------------------

def resolve_quant_config(quantization: str | None, hf_config: Any) -> QuantConfig | None:
    """The FP8 config of a model: its checkpoint's ``quantization_config`` (which ``quantization="fp8"`` may name
    too), online FP8 for ``quantization="fp8"`` on an unquantized checkpoint, or None."""
    if quantization is not None and quantization not in SUPPORTED_QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {[None, *SUPPORTED_QUANTIZATIONS]}, got {quantization!r}")
    raw = getattr(hf_config, "quantization_config", None)
    if raw is not None and not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(vars(raw))
    if not raw:
        if quantization == "fp8":
            scheme = Fp8Scheme(weight="channel", activation="dynamic_token", serialized=False)
            return QuantConfig("online", ((("Linear",), scheme),))
        return None
    method = raw.get("quant_method")
    if quantization is not None and method != quantization:
        raise ValueError(f"quantization={quantization!r} does not match the checkpoint's quantization_config."
                         f"quant_method {method!r}; leave quantization unset to use the checkpoint's")
    if method == "fp8":
        return _fine_grained(raw)
    if method == "compressed-tensors":
        return _compressed_tensors(raw)
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported; supported: 'fp8' "
                     "(fine-grained FP8, 128x128 blocks) and 'compressed-tensors' (FP8 per tensor or channel)")


def _fine_grained(raw: dict[str, Any]) -> QuantConfig:
    block = raw.get("weight_block_size")
    if block is None:
        raise ValueError("quantization_config.weight_block_size is missing: per-tensor 'fp8' checkpoints are not "
                         "supported, only fine-grained FP8 with weight_block_size [128, 128]")
    if list(block) != list(BLOCK):
        raise ValueError(f"quantization_config.weight_block_size {list(block)} is not supported; only {list(BLOCK)}")
    scheme_name = str(raw.get("activation_scheme", "dynamic")).lower()
    if scheme_name != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme {scheme_name!r} is not supported with "
                         "weight_block_size; only 'dynamic'")
    for key, allowed in (("fmt", "e4m3"), ("scale_fmt", "float"), ("expert_dtype", "fp8")):
        if raw.get(key, allowed) != allowed:
            raise ValueError(f"quantization_config.{key} {raw[key]!r} is not supported; only {allowed!r}")
    ignore = raw.get("modules_to_not_convert") or raw.get("ignored_layers") or []
    scheme = Fp8Scheme(weight="block", activation="dynamic_group", serialized=True, scale_name="weight_scale_inv")
    return QuantConfig("fp8", ((("Linear",), scheme),), tuple(ignore))


def _compressed_tensors(raw: dict[str, Any]) -> QuantConfig:
    top_format = raw.get("format")
    groups = []
    config_groups = raw.get("config_groups") or {}
    if not config_groups:
        raise ValueError("quantization_config.config_groups is empty: nothing says which layers are FP8")
    for group_name, group in config_groups.items():
        where = f"quantization_config.config_groups.{group_name}"
        fmt = group.get("format") or top_format
        if fmt not in ("float-quantized", "naive-quantized"):
            raise ValueError(f"{where}.format {fmt!r} is not supported; only 'float-quantized' FP8")
        if group.get("output_activations") is not None:
            raise ValueError(f"{where}.output_activations is not supported")
        scheme = Fp8Scheme(weight=_ct_weights(group.get("weights"), f"{where}.weights"),
                           activation=_ct_inputs(group.get("input_activations"), f"{where}.input_activations"),
                           serialized=True)
        targets = tuple(group.get("targets") or ())
        if not targets:
            raise ValueError(f"{where}.targets is empty")
        groups.append((targets, scheme))
    sparsity = raw.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise ValueError(f"quantization_config.sparsity_config.format {sparsity.get('format')!r} is not supported")
    return QuantConfig("compressed-tensors", tuple(groups), tuple(raw.get("ignore") or ()))


def _ct_float8(args: dict[str, Any], where: str) -> None:
    if args.get("num_bits") != 8 or args.get("type") != "float":
        raise ValueError(f"{where} {{num_bits: {args.get('num_bits')}, type: {args.get('type')!r}}} is not "
                         "supported; only FP8 (num_bits 8, type float)")
    if not args.get("symmetric", True):
        raise ValueError(f"{where}.symmetric false (zero points) is not supported")


def _ct_weights(args: dict[str, Any] | None, where: str) -> str:
    if not args:
        raise ValueError(f"{where} is missing: only quantized weights are supported")
    _ct_float8(args, where)
    strategy = args.get("strategy")
    if strategy not in ("tensor", "channel") or args.get("dynamic", False):
        raise ValueError(f"{where}.strategy {strategy!r} (dynamic {args.get('dynamic', False)}) is not supported; "
                         "only static 'tensor' or 'channel' weight scales")
    return strategy


def _ct_inputs(args: dict[str, Any] | None, where: str) -> str:
    if not args:
        raise ValueError(f"{where} is missing: weight-only FP8 (W8A16) is not supported")
    _ct_float8(args, where)
    strategy, dynamic = args.get("strategy"), bool(args.get("dynamic", False))
    if dynamic and strategy == "token":
        return "dynamic_token"
    if not dynamic and strategy == "tensor":
        return "static_tensor"
    raise ValueError(f"{where}.strategy {strategy!r} with dynamic {dynamic} is not supported; only dynamic "
                     "'token' or static 'tensor' activation scales")
