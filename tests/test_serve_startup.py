"""``nanovllm serve``'s start-up: flags, chat template and generation-config defaults checked before the model loads,
the port bound first, each stage logged with its time; and the served defaults that follow the generation config."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest
from transformers import AutoTokenizer

from nanovllm.entrypoints.chat_template import load_chat_template
from nanovllm.entrypoints.generation_defaults import default_sampling, parse_overrides
from nanovllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from nanovllm.entrypoints.openai.serving_base import OpenAIServing
from server_helpers import REPO_ROOT, ServerProcess, free_port, startup_limit_s

# a template unlike the tokenizer's own (testing.CHAT_TEMPLATE), so that its use shows in the tokens
TEMPLATE = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
            "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>' + 'bot: ' }}{%- endif %}")


def write_generation_config(folder: Path, **values: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, **values}))
    return folder


@pytest.fixture(scope="module")
def model_with_defaults(qwen3_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny checkpoint whose generation_config.json recommends greedy (top_k 1) and 5 new tokens."""
    path = tmp_path_factory.mktemp("with-defaults") / "model"
    shutil.copytree(qwen3_dir, path)
    write_generation_config(path, top_k=1, max_new_tokens=5, do_sample=True)
    return str(path)


# ---- the defaults, as functions ---------------------------------------------------------------------------------

def test_generation_config_modes(tmp_path: Path) -> None:
    model = write_generation_config(tmp_path / "model", temperature=0.6, top_p=0.9, top_k=20, min_p=0.05,
                                    repetition_penalty=1.1, max_new_tokens=64, do_sample=True, num_beams=1)
    other = write_generation_config(tmp_path / "other", temperature=0.3)
    # vLLM takes these six values (max_new_tokens as max_tokens) and nothing else of the file
    assert default_sampling("auto", str(model), {}) == {
        "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "max_tokens": 64}
    assert default_sampling("vllm", str(model), {}) == {}
    assert default_sampling(str(other), str(model), {}) == {"temperature": 0.3}
    assert default_sampling("auto", str(model), {"temperature": 0.0, "max_new_tokens": 8})["temperature"] == 0.0
    assert default_sampling("vllm", str(model), {"max_new_tokens": 8}) == {"max_tokens": 8}
    assert default_sampling("auto", str(tmp_path / "no-such-file"), {}) == {}  # a model without the file
    assert default_sampling("auto", str(write_generation_config(tmp_path / "k0", top_k=0)), {}) == {"top_k": -1}


def test_bad_generation_defaults_name_their_source(tmp_path: Path) -> None:
    bad = write_generation_config(tmp_path / "bad", temperature=-1.0)
    with pytest.raises(ValueError, match="generation_config.json.*temperature"):
        default_sampling("auto", str(bad), {})
    with pytest.raises(ValueError, match="override-generation-config.*top_p"):
        default_sampling("vllm", str(bad), {"top_p": 2.0})
    with pytest.raises(ValueError, match="no generation_config.json"):
        default_sampling(str(tmp_path), str(bad), {})
    with pytest.raises(ValueError, match="unknown key.*'tempreature'"):
        parse_overrides('{"tempreature": 0.5}')
    with pytest.raises(ValueError, match="JSON object"):
        parse_overrides("temperature=0.5")


def test_the_engine_and_the_server_read_generation_config_json_alike(tmp_path: Path) -> None:
    """One reader for the engine's end-of-sequence ids and the server's defaults: nothing where there is no file
    (a checkpoint without one, a GGUF file, a hub id: no download), an error naming a file that does not parse."""
    from nanovllm.engine.model_files import load_generation_config

    model = write_generation_config(tmp_path / "model", temperature=0.6)
    assert load_generation_config(str(model)).eos_token_id == 2
    gguf = model / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    for path in (str(tmp_path), str(gguf), "SomeOrg/some-model"):
        assert load_generation_config(path) is None
        assert default_sampling("auto", path, {}) == {}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "generation_config.json").write_text('{"eos_token_id": 2,')
    for read in (load_generation_config, lambda path: default_sampling("auto", path, {})):
        with pytest.raises(ValueError, match=r"cannot read .*broken/generation_config\.json"):
            read(str(broken))


def _serving(defaults: dict) -> OpenAIServing:
    serving = OpenAIServing(SimpleNamespace(tokenizer=None, vocab_size=1000), ["m"])  # type: ignore[arg-type]
    serving.default_sampling = defaults
    return serving


def test_defaults_fill_in_only_what_a_request_leaves_out() -> None:
    defaults = {"temperature": 0.6, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1,
                "max_tokens": 64}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    unset = ChatCompletionRequest(**chat)
    params = _serving(defaults).sampling_params(unset, unset.max_tokens, None, None)
    assert {k: getattr(params, k) for k in defaults} == defaults
    given = ChatCompletionRequest(**chat, temperature=0.0, top_k=-1, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                                  max_completion_tokens=3)
    params = _serving(defaults).sampling_params(given, given.max_completion_tokens, None, None)
    assert (params.temperature, params.top_k, params.top_p, params.min_p, params.repetition_penalty,
            params.max_tokens) == (0.0, -1, 1.0, 0.0, 1.0, 3)
    # without defaults, the neutral values (and a completion's 16 tokens) as before
    completion = CompletionRequest(prompt="x")
    params = _serving({}).sampling_params(completion, completion.max_tokens, None, None)
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty, params.max_tokens) == \
        (1.0, -1, 1.0, 1.0, 16)
    params = _serving({"max_tokens": 64}).sampling_params(completion, completion.max_tokens, None, None)
    assert params.max_tokens == 64


def test_chat_template_file_inline_or_error(tmp_path: Path) -> None:
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE
    with pytest.raises(ValueError, match="--chat-template.*looks like a path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="--chat-template.*does not compile"):
        load_chat_template("{% for m in messages %}{{ m.content }")


# ---- the command ------------------------------------------------------------------------------------------------

def serve(*argv: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_vars)
    return subprocess.run([sys.executable, "-m", "nanovllm", "serve", *argv, "--host", "127.0.0.1", "--device",
                           "cpu", "--dtype", "float32", "--num-kv-blocks", "64", "--max-model-len", "128"],
                          capture_output=True, text=True, timeout=startup_limit_s(), env=env)


def assert_failed_before_loading(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode != 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)
    assert "weights:" not in out.stderr and "engine core" not in out.stderr, out.stderr


def test_busy_port_fails_at_once(qwen3_dir: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        out = serve(qwen3_dir, "--port", str(port), PYTHONPROFILEIMPORTTIME="1")
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    out.stderr = "\n".join(line for line in out.stderr.splitlines() if not line.startswith("import time:"))
    assert_failed_before_loading(out, f"--port {port}", "in use")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "config:" not in out.stderr  # not even the model's config was read
    assert "nanovllm.config" in imported and "torch" not in imported  # before the heavy imports, in well under 1 s


def test_bad_default_sampling_fails_before_loading(model_with_defaults: str, tmp_path: Path) -> None:
    assert_failed_before_loading(serve(model_with_defaults, "--port", str(free_port()),
                                       "--override-generation-config", '{"temperature": -0.5}'),
                                 "temperature", "override-generation-config")
    bad_model = tmp_path / "bad"
    shutil.copytree(model_with_defaults, bad_model)
    write_generation_config(bad_model, top_p=1.5)
    assert_failed_before_loading(serve(str(bad_model), "--port", str(free_port())), "top_p", "generation_config.json")
    assert_failed_before_loading(serve(model_with_defaults, "--port", str(free_port()), "--chat-template",
                                       str(tmp_path / "nope.jinja")), "--chat-template")
    assert_failed_before_loading(serve(model_with_defaults, "--port", str(free_port()), "--generation-config",
                                       str(tmp_path / "nope")), "--generation-config")


@pytest.fixture(scope="module")
def server(model_with_defaults: str, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    srv = ServerProcess(model_with_defaults, "--num-kv-blocks", "64", "--max-model-len", "128",
                        "--served-model-name", "tiny", "--chat-template", str(template))
    yield srv
    srv.stop()


def test_start_up_stages_are_logged_in_order_with_times(server: ServerProcess) -> None:
    url = f"http://127.0.0.1:{server.port}"
    log = server.log()
    stages = [
        rf"listening on {re.escape(url)}",
        r"flags checked in \d+\.\d+ s",
        r"config: .*max_model_len 128, tokenizer of \d+ tokens, read in \d+\.\d+ s",
        r"engine core process \d+ started; loading the model",
        r"weights: Qwen3ForCausalLM .* on cpu in torch\.float32, .* loaded in \d+\.\d+ s",
        r"KV cache: 64 pages of 16 tokens = 1024 tokens, .* sized in \d+\.\d+ s",
        r"engine core process \d+ is ready \(64 KV pages\) after \d+\.\d+ s",
        rf"ready on {re.escape(url)} \(\d+\.\d+ s after start\)",
    ]
    positions = []
    for stage in stages:
        match = re.search(stage, log)
        assert match, f"no {stage!r} in the log:\n{log}"
        positions.append(match.start())
    assert positions == sorted(positions), log  # the port is bound before the config is even read
    assert "CUDA graphs" not in log  # none on CPU


def _chat(server: ServerProcess, **fields: object) -> dict:
    status, body = server.request("POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Tell me about the fox"}], "ignore_eos": True,
        **fields})
    assert status == 200, body
    return body


def test_served_defaults_follow_the_generation_config(server: ServerProcess) -> None:
    # max_new_tokens 5 when the request says nothing; the request's own max_tokens wins
    assert _chat(server)["usage"]["completion_tokens"] == 5
    assert _chat(server, max_tokens=7)["usage"]["completion_tokens"] == 7
    # top_k 1 makes sampling at the default temperature greedy, whatever the seed
    greedy = _chat(server, temperature=0.0)["choices"][0]["message"]["content"]
    assert [_chat(server, seed=seed)["choices"][0]["message"]["content"] for seed in (1, 2, 3)] == [greedy] * 3
    # a request's own top_k wins: sampling over the whole vocabulary leaves the greedy path for some seed
    sampled = {_chat(server, seed=seed, top_k=-1)["choices"][0]["message"]["content"] for seed in (1, 2, 3)}
    assert sampled != {greedy}


def test_chat_template_flag_replaces_the_tokenizer_template(server: ServerProcess, model_with_defaults: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    status, body = server.request("POST", "/tokenize", {"model": "tiny", "messages": messages})
    assert status == 200, body
    text = jinja2.Environment().from_string(TEMPLATE).render(messages=messages, add_generation_prompt=True)
    tokenizer = AutoTokenizer.from_pretrained(model_with_defaults)
    assert text != tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == tokenizer.encode(text, add_special_tokens=False)


def test_ctrl_c_stops_the_server_without_a_traceback(qwen3_dir: str) -> None:
    srv = ServerProcess(qwen3_dir, "--num-kv-blocks", "64", "--max-model-len", "128")
    try:
        srv.proc.send_signal(signal.SIGINT)  # as ctrl-C sends
        code = srv.proc.wait(startup_limit_s())
    finally:
        srv.stop()
    assert code == 130, srv.log()
    assert "Traceback" not in srv.log(), srv.log()
    assert not srv.surviving_children(timeout_s=startup_limit_s())
