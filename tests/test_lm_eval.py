"""lm-evaluation-harness against ``nanovllm serve``, as a vLLM user runs it, with no hub and no workaround.

The server (tiny model, CPU, an API key) is started with ``--enable-tokenizer-info-endpoint``, as vLLM is for
lm-eval. ``lm_eval run`` then evaluates two tasks defined here on local JSONL files: a loglikelihood task through
``local-completions``, which finds its tokenizer at ``/tokenizer_info`` (the model name "tiny" is nothing the hub or
the disk knows, and the hub is offline, so any other tokenizer would fail the run), and a generate_until task through
``local-chat-completions`` with the chat template. Each result is checked against Hugging Face transformers on the
same checkpoint: every loglikelihood, the accuracy that follows from them, and the greedy answers.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from server_helpers import API_KEY, ServerProcess, startup_limit_s

MODEL = "tiny"
MAX_NEW_TOKENS = 8
MULTIPLE_CHOICE = [
    {"question": "The capital of France is", "choices": ["Paris", "Tokyo", "London"], "answer": 0},
    {"question": "Water boils at 100 degrees", "choices": ["Celsius", "Fahrenheit"], "answer": 0},
    {"question": "A spider has", "choices": ["eight legs", "six legs", "ten legs"], "answer": 0},
    {"question": "The sun rises in the", "choices": ["east", "west"], "answer": 1},
    {"question": "My favorite colors are red, green and", "choices": ["blue", "the sea", "Monday"], "answer": 0},
]
QUESTIONS = [
    {"question": "What is the capital of Japan?", "answer": "Tokyo"},
    {"question": "How many days are in a week?", "answer": "7"},
    {"question": "Where are you going?", "answer": "To the market"},
]


@pytest.fixture(scope="module")
def server(qwen3_dir: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(qwen3_dir, "--served-model-name", MODEL, "--max-model-len", "512",
                        "--enable-tokenizer-info-endpoint", api_key=API_KEY)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def hf(qwen3_dir: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(qwen3_dir)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two lm-eval tasks on local JSONL files: ``nano_choice`` (multiple_choice: loglikelihoods) and ``nano_qa``
    (generate_until)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, docs in (("choice", MULTIPLE_CHOICE), ("qa", QUESTIONS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (root / "nano_choice.yaml").write_text(
        "task: nano_choice\n" + common.format(path=root / "choice.jsonl")
        + 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: choices\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (root / "nano_qa.yaml").write_text(
        "task: nano_qa\n" + common.format(path=root / "qa.jsonl")
        + 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: answer\n'
        f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {MAX_NEW_TOKENS}\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return root


def run_lm_eval(tasks: Path, out: Path, *args: str) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], str]:
    """``lm_eval run ARGS`` offline; returns its results, its logged samples per task, and its output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(out / "hf"),
               OPENAI_API_KEY=API_KEY)  # lm-eval's local-* models send $OPENAI_API_KEY to the API routes
    cmd = [sys.executable, "-m", "lm_eval", "run", *args, "--include_path", str(tasks), "--output_path",
           str(out / "results"), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=startup_limit_s(60))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    [results_file] = glob.glob(str(out / "results" / MODEL / "results_*.json"))
    samples = {}
    for path in glob.glob(str(out / "results" / MODEL / "samples_*.jsonl")):
        task = Path(path).name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return json.loads(Path(results_file).read_text())["results"], samples, output


def hf_loglikelihood(hf: tuple[Any, Any], context: str, continuation: str) -> float:
    model, tokenizer = hf
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
    # the documents are chosen so that the split is unambiguous (lm-eval tokenizes the whole and the context)
    assert tokenizer.encode(context + continuation, add_special_tokens=False) == context_ids + continuation_ids
    with torch.no_grad():
        logits = model(torch.tensor([context_ids + continuation_ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[len(context_ids) + i - 1, token].item() for i, token in enumerate(continuation_ids))


def hf_greedy(hf: tuple[Any, Any], prompt_ids: list[int], stop: str) -> str:
    model, tokenizer = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    text = tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
    return text.split(stop)[0]


def test_tokenizer_info_is_the_checkpoints_tokenizer_config(server: ServerProcess, qwen3_dir: str) -> None:
    status, error = server.request("GET", "/tokenizer_info")
    assert status == 401 and error["error"]["code"] == "invalid_api_key"  # vLLM guards it with the API key too
    status, info = server.request("GET", "/tokenizer_info", headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200, info
    on_disk = json.loads(Path(qwen3_dir, "tokenizer_config.json").read_text())
    for key in ("eos_token", "pad_token", "model_max_length", "clean_up_tokenization_spaces"):
        assert info[key] == on_disk[key], key
    assert info["chat_template"] == Path(qwen3_dir, "chat_template.jinja").read_text()
    assert info["tokenizer_class"] and "vocab_file" not in info and "merges_file" not in info


def test_local_completions_loglikelihoods_match_transformers(server: ServerProcess, tasks: Path, tmp_path: Path,
                                                             hf: tuple[Any, Any]) -> None:
    results, samples, output = run_lm_eval(
        tasks, tmp_path, "--model", "local-completions", "--tasks", "nano_choice", "--model_args",
        f"model={MODEL},base_url={server.v1}/completions,auth_token={API_KEY}")
    assert "Using remote tokenizer" in output  # the tokenizer came from /tokenizer_info and /tokenize
    correct = []
    for sample in samples["nano_choice"]:
        reference = [hf_loglikelihood(hf, a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        served = [float(resp[0][0]) for resp in sample["resps"]]
        assert served == pytest.approx(reference, abs=1e-3), sample["doc"]
        correct.append(max(range(len(reference)), key=reference.__getitem__) == sample["doc"]["answer"])
    assert len(correct) == len(MULTIPLE_CHOICE)
    assert results["nano_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_local_chat_completions_generate_as_transformers(server: ServerProcess, tasks: Path, tmp_path: Path,
                                                         hf: tuple[Any, Any]) -> None:
    results, samples, _ = run_lm_eval(
        tasks, tmp_path, "--model", "local-chat-completions", "--tasks", "nano_qa", "--apply_chat_template",
        "--model_args", f"model={MODEL},base_url={server.v1}/chat/completions")
    matches = []
    for sample in samples["nano_qa"]:
        messages = [{"role": "user", "content": sample["doc"]["question"]}]
        prompt_ids = hf[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        expected = hf_greedy(hf, list(prompt_ids), "\n")
        assert sample["resps"][0][0] == expected, sample["doc"]
        matches.append(expected == sample["doc"]["answer"])
    assert len(matches) == len(QUESTIONS)
    assert any(sample["resps"][0][0] for sample in samples["nano_qa"])  # text was compared, not only empty answers
    assert results["nano_qa"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))
