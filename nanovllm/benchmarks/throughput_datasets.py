"""Workloads for ``nanovllm bench throughput`` (``--dataset-name``).

- ``nano-vllm`` (the default): the original nano-vllm bench.py workload. ``random.seed(seed)``; num_prompts prompts
  of random token ids in [0, 10000] with lengths uniform in a range ([100, 1024]); then, for each, ``max_tokens``
  uniform in the same kind of range; drawn in that order, so seed 0 gives bench.py's exact requests. Ids are folded
  into a vocabulary smaller than 10,000 (tiny test models).
- ``random`` (vLLM's): prompts of ids drawn from the whole vocabulary, lengths uniform in
  ``len * [1 - r, 1 + r]`` (``--random-range-ratio``).
- ``sharegpt``: a local ShareGPT JSON file (``sharegpt.py``), tokenized with the model's tokenizer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from nanovllm.benchmarks import sharegpt
from nanovllm.benchmarks.lengths import draw_length

DATASETS = ("nano-vllm", "random", "sharegpt")


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    def longest(self) -> int:
        return max(len(p) + n for p, n in zip(self.prompts, self.max_tokens))


def nano_vllm_workload(num_prompts: int, input_range: tuple[int, int], output_range: tuple[int, int],
                       seed: int = 0) -> Workload:
    """Drawn in the original order: every prompt first, then every output length."""
    random.seed(seed)
    prompts = [
        [random.randint(0, 10000) for _ in range(random.randint(*input_range))] for _ in range(num_prompts)
    ]
    max_tokens = [random.randint(*output_range) for _ in range(num_prompts)]
    return Workload(prompts, max_tokens)


def fold_into_vocabulary(workload: Workload, vocab_size: int) -> None:
    if vocab_size <= 10000:  # a tiny test model: fold the workload's ids into its vocabulary
        workload.prompts = [[t % vocab_size for t in p] for p in workload.prompts]


def random_workload(num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    seed: int) -> Workload:
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return draw_length(rng, mean, range_ratio)

    prompts, max_tokens = [], []
    for _ in range(num_prompts):
        prompts.append([rng.randrange(vocab_size) for _ in range(length(input_len))])
        max_tokens.append(length(output_len))
    return Workload(prompts, max_tokens)


def sharegpt_workload(path: str | None, num_prompts: int, tokenizer: Any, max_model_len: int | None,
                      output_len: int | None, seed: int) -> Workload:
    if tokenizer is None:
        raise ValueError("--dataset-name sharegpt needs a tokenizer: the model's, or --tokenizer DIR")
    conversations = sharegpt.load_conversations(path, seed)

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts)["input_ids"]  # a batch at once: the same ids as one text at a time

    samples = sharegpt.sample(conversations, num_prompts, tokenize, max_model_len, output_len, seed)
    # a list of its own for each request, also where a pair is drawn again
    return Workload([list(_ids(s)) for s in samples], [s.output_len for s in samples])


def _ids(sample: sharegpt.Sample) -> tuple[int, ...]:
    assert sample.prompt_ids is not None  # tokenize gives ids, not only counts
    return sample.prompt_ids
