"""Engine flags: generated from ``EngineConfig``, spelled as vLLM spells them, defaults untouched when unset."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from nanovllm.config import EngineConfig
from nanovllm.entrypoints.cli import build_parser
from nanovllm.entrypoints.engine_args import engine_kwargs

# vLLM's flags that nano-vLLM supports, by name. Taken from `vllm serve --help` as vLLM's docs print it (engine
# arguments: vllm/engine/arg_utils.py's EngineArgs; server arguments: vllm/entrypoints/openai/cli_args.py), v0.10/
# v0.11: bools are BooleanOptionalAction (--x / --no-x), -tp and -pp are vLLM's short forms, and
# --num-gpu-blocks-override is vLLM's name of our --num-kv-blocks. --device is vLLM's until v0.10.
VLLM_ENGINE_FLAGS = [
    "--model", "--tokenizer", "--revision", "--dtype", "--seed", "--device", "--trust-remote-code",
    "--no-trust-remote-code", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size",
    "--num-gpu-blocks-override", "--gpu-memory-utilization", "--enforce-eager", "--no-enforce-eager",
    "--async-scheduling", "--no-async-scheduling", "--load-format", "--enable-prefix-caching",
    "--no-enable-prefix-caching", "--attention-backend", "--tensor-parallel-size", "-tp",
    "--pipeline-parallel-size", "-pp",
]
VLLM_SERVE_FLAGS = [
    "--host", "--port", "--served-model-name", "--api-key", "--chat-template", "--generation-config",
    "--override-generation-config", "--trust-request-chat-template", "--enable-auto-tool-choice",
    "--tool-call-parser", "--reasoning-parser", "--uvicorn-log-level",
]
# the values vLLM's --dtype takes, and what each means (vllm/config: _STR_DTYPE_TO_TORCH_DTYPE)
VLLM_DTYPES = {"auto": "auto", "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
               "float32": "float32"}
INTERNAL_FIELDS = {"hf_config"}  # filled in by the engine from the model's config, never by a user


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(load_benchmarks=False)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def option_strings(command: str) -> set[str]:
    return {option for action in subparser(command)._actions for option in action.option_strings}


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(load_benchmarks=False).parse_args(list(argv))


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_vllm_engine_flags_are_accepted(command: str) -> None:
    missing = [flag for flag in VLLM_ENGINE_FLAGS if flag not in option_strings(command)]
    assert not missing, f"{command} lacks vLLM's {missing}"


def test_vllm_serve_flags_are_accepted() -> None:
    missing = [flag for flag in VLLM_SERVE_FLAGS if flag not in option_strings("serve")]
    assert not missing, f"serve lacks vLLM's {missing}"


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_every_engine_config_field_has_a_flag(command: str) -> None:
    options = option_strings(command)
    for f in dataclasses.fields(EngineConfig):
        if f.name in INTERNAL_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in options, f"EngineConfig.{f.name} has no {flag} in `nanovllm {command}`"
        if f.type in ("bool", "bool | None"):
            assert "--no-" + flag[2:] in options, f"bool field {f.name} has no --no- form"


def _sample_value(field: dataclasses.Field, action: argparse.Action) -> tuple[list[str], object]:
    """Command-line words for the field's flag, and the value EngineConfig must end up with."""
    if isinstance(action, argparse.BooleanOptionalAction):
        value = not field.default  # None (auto) -> True
        return [("--" if value else "--no-") + field.name.replace("_", "-")], value
    if action.choices:
        return [action.option_strings[0], action.choices[-1]], action.choices[-1]
    samples = {int: 2, float: 0.5, str: "some-name"}
    value = samples[action.type]
    return [action.option_strings[0], str(value)], value


# fields valid only together with another setting
COMPANIONS = {"calculate_kv_scales": {"kv_cache_dtype": "fp8"}}


def test_each_flag_sets_its_field_with_its_type() -> None:
    actions = {a.dest: a for a in subparser("serve")._actions}
    for f in dataclasses.fields(EngineConfig):
        if f.name in INTERNAL_FIELDS or f.name == "model":
            continue
        words, expected = _sample_value(f, actions[f.name])
        kwargs = engine_kwargs(parse("serve", "m", *words))
        assert kwargs == {f.name: expected}, (words, kwargs)
        config = EngineConfig.from_kwargs("m", **kwargs, **COMPANIONS.get(f.name, {}))
        assert getattr(config, f.name) == expected


def test_unset_flags_keep_engine_config_defaults() -> None:
    assert engine_kwargs(parse("serve", "m")) == {}
    assert engine_kwargs(parse("generate", "m", "--prompt", "x")) == {}
    assert EngineConfig.from_kwargs("m", **engine_kwargs(parse("chat", "m"))) == EngineConfig("m")


def test_bool_flags_both_ways_and_short_aliases() -> None:
    assert engine_kwargs(parse("serve", "m", "--no-enable-prefix-caching"))["enable_prefix_caching"] is False
    assert engine_kwargs(parse("serve", "m", "--enable-prefix-caching"))["enable_prefix_caching"] is True
    kwargs = engine_kwargs(parse("serve", "m", "-tp", "4", "-pp", "2", "--num-gpu-blocks-override", "99"))
    assert kwargs == {"tensor_parallel_size": 4, "pipeline_parallel_size": 2, "num_kv_blocks": 99}


@pytest.mark.parametrize("spelling, meaning", sorted(VLLM_DTYPES.items()))
def test_dtype_takes_vllm_aliases(spelling: str, meaning: str) -> None:
    kwargs = engine_kwargs(parse("serve", "m", "--dtype", spelling))
    assert EngineConfig.from_kwargs("m", **kwargs).dtype == meaning
    assert EngineConfig("m", dtype=spelling).dtype == meaning  # LLM(dtype="half") as well


def test_bad_flag_values_are_refused_with_the_name() -> None:
    with pytest.raises(SystemExit):
        parse("serve", "m", "--dtype", "int8")
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig.from_kwargs("m", **engine_kwargs(parse("serve", "m", "--max-num-seqs", "0")))


def test_model_positional_or_flag() -> None:
    from nanovllm.entrypoints import cli

    def resolved(*argv: str) -> str:
        parser = build_parser(load_benchmarks=False)
        args = parser.parse_args(list(argv))
        cli._resolve_model(args, parser)
        return args.model

    assert resolved("serve", "a") == "a"
    assert resolved("serve", "--model", "a") == "a"
    assert resolved("serve", "a", "--model", "a") == "a"
    assert resolved("chat", "--model", "b") == "b"
    for argv in (("serve", "a", "--model", "b"), ("serve",), ("generate", "--prompt", "x")):
        with pytest.raises(SystemExit):
            resolved(*argv)
