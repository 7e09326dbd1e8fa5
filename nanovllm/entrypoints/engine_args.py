"""Engine arguments on the command line, generated from ``EngineConfig``'s fields (shared by ``serve``, ``generate``
and ``chat``).

The dataclass is the one source of truth: a field ``max_model_len: int | None`` with its ``option(...)`` metadata
becomes ``--max-model-len`` (type, choices, help and extra spellings such as ``-tp`` from there), and a bool field
becomes ``--flag`` / ``--no-flag`` as in vLLM. Every flag defaults to None on the parser and is passed on only when
given, so an unset flag keeps ``EngineConfig``'s default.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from nanovllm.config import EngineConfig


@dataclass(frozen=True)
class EngineFlag:
    field: str  # the EngineConfig field, also the argparse destination
    option: str  # "--max-model-len"
    aliases: tuple[str, ...]  # other option strings ("-tp", vLLM's names)
    type: type  # int, float, str or bool
    default: Any  # EngineConfig's default (shown in the help)
    help: str
    choices: tuple[str, ...] | None


def engine_flags() -> list[EngineFlag]:
    """One flag per ``EngineConfig`` field, except those whose metadata says ``flag: False`` (the model, which each
    command takes itself, and what the engine fills in)."""
    hints = typing.get_type_hints(EngineConfig)
    flags = []
    for f in dataclasses.fields(EngineConfig):
        meta = f.metadata
        if not f.init or meta.get("flag", True) is False:
            continue
        if "help" not in meta:
            raise TypeError(f"EngineConfig.{f.name} has no help: declare it with config.option(...)")
        flags.append(EngineFlag(
            field=f.name, option="--" + f.name.replace("_", "-"), aliases=tuple(meta.get("aliases") or ()),
            type=_scalar_type(f.name, hints[f.name]), default=f.default, help=meta["help"],
            choices=meta.get("choices"),
        ))
    return flags


def _scalar_type(name: str, hint: Any) -> type:
    """``int | None`` -> int; anything but one of int, float, str, bool (optional or not) has no flag spelling."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    scalars = [a for a in args if a is not type(None)]
    if len(scalars) != 1 or scalars[0] not in (int, float, str, bool):
        raise TypeError(f"EngineConfig.{name}: no command-line spelling for {hint!r}")
    return scalars[0]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine", "engine arguments (EngineConfig; unset flags keep its defaults)")
    for flag in engine_flags():
        help_text = flag.help if flag.default is None else f"{flag.help} (default: {_show(flag.default)})"
        options = [flag.option, *flag.aliases]
        if flag.type is bool:
            # --flag / --no-flag (and --no-alias for an alias): vLLM's spelling of every bool
            group.add_argument(*options, dest=flag.field, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(*options, dest=flag.field, type=flag.type, choices=flag.choices, default=None,
                               help=help_text)


def _show(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags given on the command line, as ``EngineConfig`` keyword arguments."""
    return {flag.field: getattr(args, flag.field) for flag in engine_flags()
            if getattr(args, flag.field, None) is not None}
