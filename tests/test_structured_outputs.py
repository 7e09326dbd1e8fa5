"""Structured outputs on a tiny random model, the strictest test there is: only the grammar can make its output valid.

Every output parses and validates (jsonschema), for both backends, with n > 1, chunked prefill, preemption and
overlap scheduling; unconstrained requests batched with constrained ones keep their tokens; bad constraints are
a ValueError (a 400 on the server) naming the field."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.layers.sampler import apply_token_bitmask
from nanovllm.sampling_params import StructuredOutputsParams

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "additionalProperties": False, "required": ["user", "active"], "properties": {
        "user": {"type": "object", "additionalProperties": False, "required": ["id", "tags"], "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "minItems": 1, "maxItems": 3}}},
        "active": {"type": "boolean"}}},
    "optional": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                  "note": {"type": "string", "maxLength": 5}},
                 "required": ["color"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2,
              "maxItems": 4},
    "number": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
               "required": ["x"], "additionalProperties": False},
}
PROMPTS = [[5, 6, 7], list(range(10, 40)), [99]]
ENGINE = dict(device="cpu", dtype="float32", max_model_len=512)
RUNS = {"plain": {}, "overlap": {"async_scheduling": True}, "chunked": {"max_num_batched_tokens": 8},
        "preempted": {"num_kv_blocks": 32, "block_size": 8}}  # one request fits, not all at once


def constrained(seed: int, n: int = 1, **constraint) -> SamplingParams:  # noqa: ANN003
    return SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=200,
                          structured_outputs=StructuredOutputsParams(disable_any_whitespace=True, **constraint))


@pytest.fixture(scope="module", params=["xgrammar", "llguidance"])
def backend(request: pytest.FixtureRequest) -> str:
    pytest.importorskip(request.param)
    return request.param


@pytest.fixture(scope="module", params=sorted(RUNS))
def llm(qwen3_dir: str, backend: str, request: pytest.FixtureRequest) -> Iterator[LLM]:
    yield LLM(qwen3_dir, structured_outputs_backend=backend, **ENGINE, **RUNS[request.param])


def test_every_output_follows_its_schema(llm: LLM) -> None:
    params = [constrained(seed, n=2, json=schema) for seed, schema in enumerate(SCHEMAS.values())]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    # two long unconstrained requests, so that the small pool preempts
    fillers = [SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)] * 2
    outs = llm.generate(prompts + PROMPTS[:2], params + fillers, use_tqdm=False)
    for out, schema in zip(outs, SCHEMAS.values()):
        for sample in out.outputs:
            assert sample.finish_reason == "stop", sample
            jsonschema.validate(json.loads(sample.text), schema)
    if llm.engine.config.num_kv_blocks == RUNS["preempted"]["num_kv_blocks"]:
        assert llm.engine.core.scheduler.num_preemptions > 0


def test_regex_choice_grammar_and_any_json_object(llm: LLM) -> None:
    params = [constrained(1, regex=r"[a-z]{2,5}-\d{2}"), constrained(2, choice=["yes", "no", "not sure"]),
              constrained(3, grammar='root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'), constrained(4, json_object=True)]
    regex, choice, grammar, anything = llm.generate([PROMPTS[0]] * 4, params, use_tqdm=False)
    assert re.fullmatch(r"[a-z]{2,5}-\d{2}", regex.text)
    assert choice.text in ("yes", "no", "not sure")
    assert re.fullmatch(r"\(\d+(\+\d+)*\)", grammar.text)
    assert isinstance(json.loads(anything.text), dict)
    assert all(o.finish_reason == "stop" for o in (regex, choice, grammar, anything))


def test_unconstrained_requests_keep_their_tokens(llm: LLM) -> None:
    plain = [SamplingParams(temperature=0.8, seed=s, max_tokens=20, ignore_eos=True) for s in range(3)]
    alone = llm.generate(PROMPTS, plain, use_tqdm=False)
    mixed = llm.generate(PROMPTS + PROMPTS, plain + [constrained(s, json=SCHEMAS["nested"]) for s in range(3)],
                         use_tqdm=False)
    assert [o.token_ids for o in mixed[:3]] == [o.token_ids for o in alone]
    for out in mixed[3:]:
        jsonschema.validate(json.loads(out.text), SCHEMAS["nested"])


@pytest.mark.parametrize("constraint,field", [
    ({"json": {"type": "no-such-type"}}, "structured_outputs.json"),
    ({"regex": "(unclosed"}, "structured_outputs.regex"),
    ({"grammar": 'root ::= undefined_rule'}, "structured_outputs.grammar"),
])
def test_a_bad_constraint_is_a_value_error_naming_it(qwen3_dir: str, backend: str, constraint: dict,
                                                      field: str) -> None:
    llm = LLM(qwen3_dir, structured_outputs_backend=backend, num_kv_blocks=16, **ENGINE)
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.generate([PROMPTS[0]], SamplingParams(structured_outputs=StructuredOutputsParams(**constraint)),
                     use_tqdm=False)
    assert not llm.engine.core.scheduler.requests


def test_a_schema_compiles_once(qwen3_dir: str) -> None:
    llm = LLM(qwen3_dir, num_kv_blocks=32, **ENGINE)
    params = [constrained(seed, json=SCHEMAS["flat"]) for seed in range(4)]
    llm.generate([PROMPTS[0]] * 4, params, use_tqdm=False)
    assert len(llm.engine.core.structured._cache) == 1


def _wait_for_grammar(manager, state) -> None:  # noqa: ANN001
    state.compiled.exception(timeout=120)  # a bound no compile of these comes near; raises TimeoutError past it
    assert manager.poll(state)


def test_a_backend_that_cannot_start_fails_with_its_own_error() -> None:
    pytest.importorskip("xgrammar")
    from nanovllm.engine.structured_output import StructuredOutputManager

    def no_tokenizer():  # noqa: ANN202
        raise OSError("tokenizer files missing")

    manager = StructuredOutputManager("xgrammar", 64, no_tokenizer)
    state = manager.start(StructuredOutputsParams(regex="a+"), frozenset([0]))
    _wait_for_grammar(manager, state)
    assert state.matcher is None and "tokenizer files missing" in state.error


def test_a_stop_token_beyond_the_tokenizer_still_gives_a_grammar(qwen3_dir: str, backend: str) -> None:
    """Dummy weights with another model's tokenizer (bench throughput --tokenizer): the model's EOS id lies past
    the tokenizer's vocabulary. Both backends still constrain, and the choice completes."""
    from transformers import AutoTokenizer

    from nanovllm.engine.structured_output import StructuredOutputManager

    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    vocab = len(tokenizer) + 64
    manager = StructuredOutputManager(backend, vocab, lambda: tokenizer)
    state = manager.start(StructuredOutputsParams(choice=["yes", "no"]), frozenset([vocab - 1]))
    _wait_for_grammar(manager, state)
    assert state.error is None
    for token in tokenizer.encode("no", add_special_tokens=False):
        mask = manager.bitmask([state.matcher])
        assert mask.shape[1] == (len(tokenizer) + 31) // 32  # the tokenizer's ids, not the padded head's
        assert mask[0, token // 32] >> (token % 32) & 1
        # as the sampler reads it, over the model's whole head: nothing past the tokenizer is ever allowed
        logits = apply_token_bitmask(torch.zeros(1, vocab), torch.tensor([0]), torch.from_numpy(mask))
        allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
        assert token in allowed and max(allowed) < len(tokenizer)
        assert manager.accept([state.matcher], [token]) == [True]
    assert state.matcher.is_terminated()


@pytest.mark.parametrize("words", [4, 2, 1])  # the whole vocabulary (100 ids), and bitmasks that end before it
def test_the_bitmask_blocks_what_it_does_not_allow(words: int) -> None:
    generator = torch.Generator().manual_seed(words)
    logits = torch.randn(4, 100, generator=generator)
    rows = torch.tensor([1, 3])
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, words), dtype=torch.int32, generator=generator)
    out = apply_token_bitmask(logits, rows, bitmask)
    for row in range(4):
        for token in range(100):
            if row in (1, 3):
                word = token // 32
                bits = bitmask[(1, 3).index(row)]
                allowed = word < words and (int(bits[word]) >> (token % 32)) & 1
            else:
                allowed = True
            assert out[row, token] == (logits[row, token] if allowed else float("-inf")), (row, token)
