"""``nanovllm bench serve`` against a live tiny server, run as a user runs it (a subprocess): it fits the served model
without being told, exits 0 with numbers that agree with the server and the tokenizer, and exits non-zero with one
line when the key is missing or requests fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server_helpers import API_KEY, REPO_ROOT, ServerProcess, startup_limit_s

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def server(qwen3_dir: str) -> Iterator[ServerProcess]:
    """A tiny server with a short context, behind an API key."""
    srv = ServerProcess(qwen3_dir, "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "128", api_key=API_KEY)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def info_server(qwen3_dir: str) -> Iterator[ServerProcess]:
    """The same, answering /tokenizer_info (which the API key guards)."""
    srv = ServerProcess(qwen3_dir, "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "128",
                        "--enable-tokenizer-info-endpoint", api_key=API_KEY)
    try:
        yield srv
    finally:
        srv.stop()


def bench(server: ServerProcess, *args: str, key: str | None = API_KEY) -> subprocess.CompletedProcess:
    """``python -m nanovllm bench serve`` against ``server``; the key goes in $OPENAI_API_KEY (None: no key)."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OPENAI_API_KEY", None)
    if key is not None:
        env["OPENAI_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "nanovllm", "bench", "serve", "--port", str(server.port),
                           "--disable-tqdm", *args], capture_output=True, text=True, env=env,
                          timeout=startup_limit_s())


def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


def test_defaults_fit_the_served_model(server: ServerProcess, tmp_path) -> None:  # noqa: ANN001
    """No lengths given: the defaults (1,024 in, 128 out) shrink to the server's 64-token context, and every request
    succeeds (the issue's run failed 200 of 200 with out-of-vocabulary ids and exited 0)."""
    path = tmp_path / "result.json"
    out = bench(server, "--num-prompts", "5", "--save-result", str(path), "--save-detailed")
    assert out.returncode == 0, out.stderr
    saved = json.loads(path.read_text())
    summary, requests = saved["summary"], saved["requests"]
    assert saved["max_model_len"] == MAX_MODEL_LEN and saved["backend"] == "openai"
    assert summary["completed"] == 5 and summary["failed"] == 0
    # the lengths are the server's own counts (usage), and each request fit its context
    assert all(i + o <= MAX_MODEL_LEN for i, o in zip(requests["input_lens"], requests["output_lens"]))
    assert summary["total_input_tokens"] == sum(requests["input_lens"]) > 5 * MAX_MODEL_LEN // 2
    assert summary["total_output_tokens"] == sum(requests["output_lens"]) > 0
    assert len(set(requests["output_lens"])) == 1  # ignore_eos: each ran to the same max_tokens
    assert all(0 < t <= e for t, e in zip(requests["ttfts"], requests["e2els"]))
    assert "Successful requests:" in out.stdout


def test_exact_token_id_prompts_with_a_tokenizer(server: ServerProcess, qwen3_dir: str) -> None:
    """With --tokenizer the prompts are token ids of exact length: the server counts what was asked for."""
    out = bench(server, "--tokenizer", qwen3_dir, "--num-prompts", "4", "--random-input-len", "20",
                "--random-output-len", "5", "--request-rate", "50", "--max-concurrency", "2")
    assert out.returncode == 0, out.stderr
    assert _printed(out.stdout, "Total input tokens") == 4 * 20
    assert _printed(out.stdout, "Total output tokens") == 4 * 5


def test_token_id_prompts_from_the_servers_tokenizer_info(info_server: ServerProcess, qwen3_dir: str) -> None:
    """No --tokenizer: the vocabulary comes from our own server's /tokenizer_info, asked with the API key, so the
    prompts are token ids of exact length (the server counts what was asked for), none of them special."""
    from nanovllm.benchmarks.serve_server import ServerError, _tokenizer_info, discover

    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    model_vocab = json.loads((Path(qwen3_dir) / "config.json").read_text())["vocab_size"]
    info = discover(info_server.base_url, API_KEY, None, startup_limit_s())
    assert info.vocab_size == min(len(tokenizer), model_vocab)
    assert info.special_ids >= set(tokenizer.all_special_ids)
    with pytest.raises(ServerError, match="/tokenizer_info answered HTTP 401"):  # the key guards it, as it does /v1
        _tokenizer_info(info_server.base_url, None, startup_limit_s())
    out = bench(info_server, "--num-prompts", "4", "--random-input-len", "20", "--random-output-len", "5",
                "--prompt-format", "ids")
    assert out.returncode == 0, out.stderr
    assert f"token ids below {info.vocab_size} (the server's /tokenizer_info)" in out.stderr
    assert _printed(out.stdout, "Total input tokens") == 4 * 20


def test_chat_backend(server: ServerProcess, qwen3_dir: str, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "chat.json"
    out = bench(server, "--backend", "openai-chat", "--tokenizer", qwen3_dir, "--num-prompts", "3",
                "--random-input-len", "12", "--random-output-len", "4", "--save-result", str(path))
    assert out.returncode == 0, out.stderr
    saved = json.loads(path.read_text())
    assert saved["endpoint"].endswith("/v1/chat/completions")
    summary = saved["summary"]
    assert summary["completed"] == 3 and summary["total_output_tokens"] == 3 * 4
    assert summary["ttft"]["mean_ms"] > 0 and summary["tpot"]["mean_ms"] > 0
    # the prompt as the server counts it: the text plus the chat template around it
    assert summary["total_input_tokens"] > 3 * 12 * 0.5


def test_sharegpt_from_a_local_file(server: ServerProcess, qwen3_dir: str, tmp_path) -> None:  # noqa: ANN001
    """ShareGPT's format, counted by the server's /tokenize (no --tokenizer): records with one turn, pairs under 4
    tokens and pairs longer than the context are skipped; the rest run with their reply's length as output."""
    from nanovllm.testing import CORPUS

    lines = CORPUS.splitlines()
    short = [" ".join(line.split()[:6]) for line in lines]  # a few words each: pairs of ~10-30 tokens
    records = [{"conversations": [{"from": "human", "value": short[i]}, {"from": "gpt", "value": short[i + 1]}]}
               for i in range(0, 12, 2)]
    records.append({"conversations": [{"from": "human", "value": "only one turn"}]})
    records.append({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": short[0]}]})
    records.append({"conversations": [{"from": "human", "value": " ".join(lines[:4])}, {"from": "gpt", "value": "x"}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    pairs = [r["conversations"] for r in records if len(r["conversations"]) > 1]
    counts = [(len(tokenizer(p["value"]).input_ids), len(tokenizer(c["value"]).input_ids)) for p, c, *_ in pairs]
    valid = [(p, c) for p, c in counts if p >= 4 and c >= 4 and p + c <= MAX_MODEL_LEN]
    assert 0 < len(valid) < len(counts)  # the file tests the filter both ways
    out = bench(server, "--dataset-name", "sharegpt", "--dataset-path", str(path), "--num-prompts", str(len(valid)))
    assert out.returncode == 0, out.stderr
    assert _printed(out.stdout, "Successful requests") == len(valid)
    assert _printed(out.stdout, "Total input tokens") == sum(p for p, _ in valid)
    assert _printed(out.stdout, "Total output tokens") == sum(c for _, c in valid)


def test_without_the_api_key_one_line_and_non_zero(server: ServerProcess) -> None:
    for key in (None, "wrong-key"):
        out = bench(server, "--num-prompts", "2", key=key)
        assert out.returncode != 0
        assert "Traceback" not in out.stderr, out.stderr
        (line,) = error_lines(out)
        assert "401" in line and "--api-key" in line
    out = bench(server, "--num-prompts", "1", "--random-output-len", "2", "--api-key", API_KEY, key=None)
    assert out.returncode == 0, out.stderr  # the flag works as well as $OPENAI_API_KEY


def test_failed_requests_exit_non_zero_naming_the_first_error(server: ServerProcess) -> None:
    """Ids drawn below a vocabulary larger than the model's: the server refuses them, and the benchmark says so."""
    out = bench(server, "--num-prompts", "4", "--vocab-size", "100000", "--random-input-len", "16",
                "--random-output-len", "2")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr
    (line,) = error_lines(out)
    assert "4 of 4 requests failed" in line and "prompt token ids must be in [0, 512)" in line
    assert _printed(out.stdout, "Failed requests") == 4


def test_lengths_that_cannot_fit_are_refused_before_sending(server: ServerProcess) -> None:
    out = bench(server, "--num-prompts", "2", "--random-input-len", "100")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = error_lines(out)
    assert "--random-input-len 100" in line and f"max_model_len {MAX_MODEL_LEN}" in line
    assert "Successful requests" not in out.stdout


def _printed(stdout: str, label: str) -> int:
    line = next(line for line in stdout.splitlines() if line.startswith(label + ":"))
    return int(float(line.split()[-1]))
