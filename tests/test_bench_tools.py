"""The benchmark's own instruments, and the staging layout the GPU kernels rely on, checked on the CPU."""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nanovllm.benchmarks import throughput
from nanovllm.benchmarks.step_trace import GcWatch, StepRecord, summarise
from nanovllm.executor.staging import HostStager


def test_staged_arrays_are_16_byte_aligned_whatever_their_lengths():
    """Triton specialises kernels on 16-byte pointer alignment: a staged view that is aligned in one step and not
    in the next would compile a new kernel variant mid-run."""
    stager = HostStager(torch.device("cpu"))
    rng = np.random.default_rng(0)
    for _ in range(50):
        arrays = {
            "a": rng.integers(0, 100, rng.integers(1, 40)).astype(np.int32),
            "b": rng.integers(0, 100, rng.integers(1, 40)).astype(np.int64),
            "c": rng.random(rng.integers(1, 9)).astype(np.float32),
            "d": rng.integers(0, 100, (rng.integers(1, 5), rng.integers(1, 7))).astype(np.int32),
        }
        staged = stager.transfer(arrays)
        base = stager.slots[(stager.next_slot - 1) % len(stager.slots)][1].data_ptr()
        for name, array in arrays.items():
            assert (staged[name].data_ptr() - base) % 16 == 0, name
            assert torch.equal(staged[name], torch.from_numpy(array)), name


def test_summarise_groups_steps_by_kind():
    records = [StepRecord(10.0, 9.0, 3, 100), StepRecord(2.0, 1.0, 200, 0), StepRecord(4.0, 1.0, 150, 0),
               StepRecord(1.0, 0.5, 5, 0), StepRecord(1.5, 0.5, 0, 0)]
    rows = {row["kind"]: row for row in summarise(records)}
    assert set(rows) == {"with prefill", "decode 129-256", "decode 1-16"}
    assert rows["decode 129-256"]["steps"] == 2 and rows["decode 129-256"]["mean_ms"] == 3.0
    assert rows["decode 129-256"]["mean_host_ms"] == 1.0 and rows["decode 129-256"]["max_ms"] == 4.0
    assert rows["decode 1-16"]["steps"] == 2  # an empty step counts with the smallest decodes
    assert sum(row["steps"] for row in rows.values()) == len(records)


def test_throughput_bench_accounts_for_every_step(qwen3_dir: str, tmp_path):
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    log = tmp_path / "steps.json"
    args = parser.parse_args(["--model", qwen3_dir, "--device", "cpu", "--dtype", "float32", "--num-prompts", "6",
                              "--max-model-len", "256", "--step-log", str(log)])
    result = throughput.main(args)
    rows = result["steps_by_kind"]
    assert sum(row["steps"] for row in rows) == result["steps"]
    assert any(row["kind"] == "with prefill" for row in rows)
    step_seconds = sum(row["total_s"] for row in rows)
    assert 0 < step_seconds <= result["elapsed_s"]
    assert log.exists() and len(json.loads(log.read_text())) == result["steps"]
    assert result["output_tokens"] > 0


def test_gc_watch_counts_collections_while_started():
    import gc

    watch = GcWatch()
    watch.start()
    gc.collect()  # a full collection: generation 2
    gc.collect(0)
    watch.stop()
    gc.collect()  # after stop: not counted
    assert watch.counts[2] == 1 and watch.counts[0] >= 1
    assert watch.longest_ms <= watch.total_ms
    assert watch.describe().startswith(f"{watch.counts[0]} / {watch.counts[1]} / 1 collections")


def test_summarise_adds_device_and_idle_time():
    records = [StepRecord(5.0, 1.0, 200, 0, device_ms=6.0, idle_ms=0.0),
               StepRecord(5.0, 4.5, 200, 0, device_ms=3.0, idle_ms=1.5)]
    (row,) = summarise(records)
    assert row["device_s"] == 0.009 and row["idle_s"] == 0.0015


def test_a_failed_peer_is_reported_not_measured(qwen3_dir: str, tmp_path, monkeypatch):
    def failing_peer(*args, **kwargs):
        raise RuntimeError("HF continuous batching returned 10 of the 100 tokens asked for")

    monkeypatch.setattr(throughput, "run_hf_continuous_batching", failing_peer)
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    args = parser.parse_args(["--model", qwen3_dir, "--device", "cpu", "--dtype", "float32", "--num-prompts", "2",
                              "--max-model-len", "256", "--compare-hf"])
    result = throughput.main(args)
    assert "10 of the 100" in result["hf_error"]
    assert "hf_output_tok_per_s" not in result and "speedup_vs_hf" not in result
    assert result["output_tokens"] > 0


def _throughput_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_throughput_random_dataset_counts_every_sample(qwen3_dir: str, capsys, caplog) -> None:  # noqa: ANN001
    """vLLM's random workload with n samples per prompt, on the context the model allows (no --max-model-len), with
    the progress bar on."""
    caplog.set_level(logging.INFO)
    args = _throughput_args("--model", qwen3_dir, "--device", "cpu", "--dtype", "float32", "--dataset-name", "random",
                            "--input-len", "12", "--output-len", "3", "--n", "2", "--num-prompts", "3", "--seed", "1")
    result = throughput.main(args)
    config = json.loads((Path(qwen3_dir) / "config.json").read_text())
    assert result["max_model_len"] == config["max_position_embeddings"]
    assert result["prompt_tokens"] == 3 * 12 and result["output_tokens"] == 3 * 2 * 3  # ignore_eos: every sample
    assert result["dataset"] == "random" and result["n"] == 2 and result["enable_prefix_caching"] is True
    captured = capsys.readouterr()
    assert "Processed prompts" in captured.err and "3/3" in captured.err
    # the start-up line counts whole requests of max_model_len that fit the KV pool ("256.0 requests" before)
    fits = re.search(r"([\d.]+) requests of max_model_len (\d+) at once", caplog.text)
    assert fits is not None and fits.group(1).isdigit() and int(fits.group(2)) == result["max_model_len"]


def test_throughput_sharegpt_dataset(qwen3_dir: str, tmp_path) -> None:  # noqa: ANN001
    """A local ShareGPT file, tokenized with the model's tokenizer: pairs too short or too long for the context
    are skipped, and each reply's length is its request's output."""
    from transformers import AutoTokenizer

    from nanovllm.testing import CORPUS

    words = [line.split() for line in CORPUS.splitlines()]
    pairs = [(" ".join(words[i][:5]), " ".join(words[i + 1][:4])) for i in range(0, 10, 2)]
    pairs += [("Hi", "Hello there, how are you?"), (" ".join(" ".join(w) for w in words[:5]), "a long prompt")]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": c}]}
                                for p, c in pairs] + [{"conversations": []}]))
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    counts = [(len(tokenizer(p).input_ids), len(tokenizer(c).input_ids)) for p, c in pairs]
    valid = [(p, c) for p, c in counts if p >= 4 and c >= 4 and p + c <= 96]
    assert 0 < len(valid) < len(pairs)
    args = _throughput_args("--model", qwen3_dir, "--device", "cpu", "--dtype", "float32", "--dataset-name",
                            "sharegpt", "--dataset-path", str(path), "--num-prompts", str(len(valid)),
                            "--max-model-len", "96", "--disable-tqdm")
    result = throughput.main(args)
    assert result["num_prompts"] == len(valid)
    assert result["prompt_tokens"] == sum(p for p, _ in valid)
    assert result["output_tokens"] == sum(c for _, c in valid)


def test_sharegpt_workload_tokenizes_each_text_once_to_the_ids_of_one_at_a_time(tmp_path) -> None:  # noqa: ANN001
    """The texts go through the tokenizer once, in batches, yet the same pairs qualify and each prompt's ids are
    those of tokenizing it alone (what the workload did before)."""
    from tokenizers.processors import TemplateProcessing

    from nanovllm.benchmarks import sharegpt
    from nanovllm.benchmarks.throughput_datasets import sharegpt_workload
    from nanovllm.testing import CORPUS, build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    # a BOS before every text, as Llama's tokenizers add: the ids must come from the same call as before
    bos = "<|im_start|>"
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    pairs = [(lines[i], lines[i + 1]) for i in range(0, len(lines) - 1, 2)]
    pairs += [(" leading space, \u00e9t\u00e9 \U0001f600 and\ttabs\n", "d\u00e9j\u00e0 vu <|im_end|>"),
              ("Hi", "a prompt too short"), ("x " * 700, "a prompt too long")]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": c}]}
                                for p, c in pairs]))
    batches: list[list[str]] = []

    def recording(texts: list[str], **kwargs: object):  # noqa: ANN202
        batches.append(texts)
        return tokenizer(texts, **kwargs)

    def alone(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    num = len(pairs) + 5  # more than qualify: the whole file is read and some pairs are drawn again
    for output_len in (None, 7):
        expected = sharegpt.sample(sharegpt.load_conversations(str(path), 1), num,
                                   lambda texts: [len(alone(t)) for t in texts], 96, output_len, 1)
        batches.clear()
        workload = sharegpt_workload(str(path), num, recording, 96, output_len, 1)
        assert workload.prompts == [alone(s.prompt) for s in expected]
        assert workload.max_tokens == [s.output_len for s in expected]
        assert 0 < len(set(map(tuple, workload.prompts))) < len(pairs)
        assert len({id(p) for p in workload.prompts}) == num  # a list of its own for each request
        assert all(isinstance(texts, list) for texts in batches)
        texts = [p for p, _ in pairs] + ([c for _, c in pairs] if output_len is None else [])
        assert sorted(t for batch in batches for t in batch) == sorted(texts)


def test_throughput_workloads_follow_the_seed_and_the_context() -> None:
    from nanovllm.benchmarks.throughput import build_workload

    def workload(*argv: str, max_model_len: int = 4096, small: bool = True):  # noqa: ANN202
        return build_workload(_throughput_args(*argv), small, 512, None, max_model_len)

    assert workload("--seed", "3").prompts == workload("--seed", "3").prompts != workload("--seed", "4").prompts
    assert all(0 <= t < 512 for p in workload().prompts for t in p)  # folded into a small vocabulary
    random_one = workload("--dataset-name", "random", "--input-len", "10", "--output-len", "5",
                          "--random-range-ratio", "0.5", "--num-prompts", "50")
    assert all(5 <= len(p) <= 15 for p in random_one.prompts) and all(2 <= n <= 7 for n in random_one.max_tokens)
    assert len({len(p) for p in random_one.prompts}) > 3
    # defaults shrink to a short context; given lengths that cannot fit, and the GPU-sized nano-vllm workload,
    # are refused by flag
    shrunk = workload("--dataset-name", "random", max_model_len=40)
    assert all(len(p) + n <= 40 for p, n in zip(shrunk.prompts, shrunk.max_tokens))
    with pytest.raises(ValueError, match="--input-len 100"):
        workload("--dataset-name", "random", "--input-len", "100", max_model_len=40)
    with pytest.raises(ValueError, match="--max-model-len 1024"):
        workload(max_model_len=1024, small=False)


@pytest.mark.parametrize("backend", ["xgrammar", "llguidance"])
def test_grammar_step_bench_drives_matchers_to_their_end(qwen3_dir: str, backend: str) -> None:
    """Every token it feeds comes from the row's own bitmask (over a head padded past the tokenizer), so a matcher
    refusing one (a RuntimeError) would be a bitmask bug."""
    pytest.importorskip(backend)
    from nanovllm.benchmarks import grammar_step

    result = grammar_step.main(["--tokenizer", qwen3_dir, "--vocab-size", "512", "--rows", "4", "--steps", "400",
                                "--backend", backend])
    assert result["tokens"] >= result["steps"] > 0


@pytest.mark.parametrize("overlap", [True, False])
def test_engine_host_bench_runs_the_whole_workload(overlap: bool) -> None:
    """The stub executor's steps go through the real scheduler and processors: every output token of the workload
    is generated, and the decode steps are timed by batch size."""
    from nanovllm.benchmarks import engine_host
    from nanovllm.benchmarks.throughput_datasets import nano_vllm_workload

    result = engine_host.main(["--num-prompts", "24"] + ([] if overlap else ["--no-overlap"]))
    assert result["generated_tokens"] == result["expected_tokens"] > 24 * 100
    assert result["finish_reasons"] == {"length": 24}
    steps = result["steps"]
    longest = max(nano_vllm_workload(24, (100, 1024), (100, 1024)).max_tokens)
    assert steps["all steps"]["steps"] >= longest  # a step per output token of the longest (its prefill gives one)
    assert sum(row["steps"] for name, row in steps.items() if name.startswith("decode")) > 0


def test_engine_host_bench_samples_constrained_rows_from_their_bitmask(qwen3_dir: str) -> None:
    """Half the requests follow the JSON schema; the stub draws their tokens from the grammar's bitmask, so every
    one ends by its grammar or its length and none fails (a token its matcher refused would end it in an error)."""
    pytest.importorskip("xgrammar")
    from nanovllm.benchmarks import engine_host

    result = engine_host.main(["--num-prompts", "8", "--structured-fraction", "0.5", "--tokenizer", qwen3_dir])
    reasons = result["finish_reasons"]
    assert sum(reasons.values()) == 8 and set(reasons) <= {"length", "stop"} and reasons.get("stop", 0) >= 1
    assert 0 < result["generated_tokens"] < result["expected_tokens"]
