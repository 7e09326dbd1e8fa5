"""GPU tests. The Triton kernel tests also run without a GPU, on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, which ``tests/conftest.py`` sets when there is no CUDA); elsewhere they skip."""
from __future__ import annotations

import os

import pytest
import torch


def kernel_device() -> torch.device | None:
    """CUDA when present, else the CPU under Triton's interpreter, else None (the kernel tests skip)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    return None


def kernel_test_marks(device: torch.device | None) -> list:
    return [
        pytest.mark.gpu,
        pytest.mark.skipif(device is None, reason="needs CUDA, or TRITON_INTERPRET=1 for the CPU interpreter"),
    ]


def decode_logprobs(model: str, **engine_args) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens of 48 short random prompts, 8 each, with each chosen token's logprob."""
    import random

    from nanovllm import LLM, SamplingParams

    rng = random.Random(1)
    prompts = [[rng.randint(3, 470) for _ in range(rng.randint(5, 60))] for _ in range(48)]
    llm = LLM(model, device="cuda", max_model_len=512, enable_prefix_caching=False, **engine_args)
    try:
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0),
                               use_tqdm=False)
    finally:
        llm.shutdown()
    return [(o.token_ids, [next(iter(entry.values())) for entry in o.outputs[0].logprobs]) for o in outputs]


def assert_decode_drift_within_eager(exact: list, eager: list, fast: list, min_positions: int = 40) -> None:
    """``fast`` (bf16) drifts from ``exact`` (float32) no more than ``eager`` (bf16) does, over the decode steps where
    all three runs chose the same tokens so far (position 0 is the prefill's token, so it is left out)."""
    eager_errors, fast_errors = [], []
    for (tokens, reference), (eager_tokens, eager_lp), (fast_tokens, fast_lp) in zip(exact, eager, fast):
        same = next((i for i, t in enumerate(zip(tokens, eager_tokens, fast_tokens)) if len(set(t)) > 1), len(tokens))
        eager_errors += [abs(a - b) for a, b in zip(eager_lp[1:same], reference[1:same])]
        fast_errors += [abs(a - b) for a, b in zip(fast_lp[1:same], reference[1:same])]
    assert len(fast_errors) >= min_positions, f"only {len(fast_errors)} decode steps where the runs agree"
    eager_error, fast_error = sum(eager_errors) / len(eager_errors), sum(fast_errors) / len(fast_errors)
    assert fast_error < 1.5 * eager_error + 1e-3, (fast_error, eager_error, len(fast_errors))
