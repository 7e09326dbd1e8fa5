"""Structured outputs on the GPU fast path: Triton attention, CUDA graphs and overlap scheduling, where the grammar
bitmask reaches the sampler after the step was launched (deferred sampling)."""
from __future__ import annotations

import json

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.sampling_params import StructuredOutputsParams

jsonschema = pytest.importorskip("jsonschema")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "tags"], "properties": {
    "id": {"type": "integer", "minimum": 1, "maximum": 999},
    "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "minItems": 1, "maxItems": 3}}}
PROMPTS = [[5, 6, 7], list(range(10, 60)), [99]]


def constrained(seed: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, n=2, max_tokens=200,
                          structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))


@pytest.mark.parametrize("backend", ["xgrammar", "llguidance"])
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_constrained_and_free_rows_share_graph_steps(qwen3_dir: str, backend: str, async_scheduling: bool) -> None:
    pytest.importorskip(backend)
    llm = LLM(qwen3_dir, device="cuda", dtype="float32", max_model_len=512, structured_outputs_backend=backend,
              async_scheduling=async_scheduling)
    free = [SamplingParams(temperature=0.8, seed=s, max_tokens=40, ignore_eos=True) for s in range(3)]
    alone = llm.generate(PROMPTS, free, use_tqdm=False)
    mixed = llm.generate(PROMPTS * 3, free + [constrained(s) for s in range(6)], use_tqdm=False)
    assert [o.token_ids for o in mixed[:3]] == [o.token_ids for o in alone]
    for out in mixed[3:]:
        for sample in out.outputs:
            assert sample.finish_reason == "stop", sample
            jsonschema.validate(json.loads(sample.text), SCHEMA)
    assert llm.engine.core.kv.allocator.num_used == llm.engine.core.kv.prefix_cache.num_cached_pages
