"""``nanovllm bench serve`` and ``bench throughput`` spell their flags as vLLM does (old spellings still work), and
the pieces that decide lengths and prompts do what they say. No engine and no server here: fast."""
from __future__ import annotations

import argparse
import http.server
import json
import logging
import math
import random
import threading
from collections.abc import Iterator

import pytest

from nanovllm.benchmarks import lengths, serve, serve_args, throughput
from nanovllm.benchmarks.serve_datasets import COMMON_WORDS, PromptMaker
from nanovllm.benchmarks.serve_server import ServerError, discover
from nanovllm.config import EngineConfig
from nanovllm.entrypoints.cli import build_parser
from nanovllm.entrypoints.engine_args import engine_flags

# vLLM's `vllm bench serve` flags this benchmark supports, as vLLM's docs spell them
VLLM_SERVE_FLAGS = (
    "--backend", "--base-url", "--host", "--port", "--endpoint", "--model", "--tokenizer", "--dataset-name",
    "--dataset-path", "--num-prompts", "--seed", "--request-rate", "--burstiness", "--max-concurrency",
    "--input-len", "--output-len", "--random-input-len", "--random-output-len", "--random-range-ratio",
    "--sharegpt-output-len", "--prefix-repetition-prefix-len", "--prefix-repetition-suffix-len",
    "--prefix-repetition-num-prefixes", "--prefix-repetition-output-len", "--ignore-eos", "--goodput",
    "--metric-percentiles", "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", "--result-filename",
)
# vLLM's `vllm bench throughput` flags this benchmark supports
VLLM_THROUGHPUT_FLAGS = (
    "--model", "--tokenizer", "--dataset-name", "--dataset-path", "--num-prompts", "--seed", "--n", "--input-len",
    "--output-len", "--random-range-ratio", "--output-json", "--disable-tqdm", "--max-model-len", "--dtype",
    "--enforce-eager", "--load-format", "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization",
    "--tensor-parallel-size", "--pipeline-parallel-size", "--enable-prefix-caching", "--no-enable-prefix-caching",
)


def bench_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def option_strings(name: str) -> set[str]:
    bench = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return {s for action in sub._actions for s in action.option_strings}


@pytest.mark.parametrize(("name", "flags"), [("serve", VLLM_SERVE_FLAGS), ("throughput", VLLM_THROUGHPUT_FLAGS)])
def test_vllm_flag_names_are_accepted(name: str, flags: tuple[str, ...]) -> None:
    missing = sorted(set(flags) - option_strings(name))
    assert not missing, f"bench {name} lacks vLLM's {missing}"


def test_serve_urls_follow_backend_host_port_and_base_url() -> None:
    assert serve_args.urls(bench_args("serve")) == ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1/completions")
    chat = bench_args("serve", "--backend", "openai-chat", "--host", "10.0.0.2", "--port", "9000")
    assert serve_args.urls(chat) == ("http://10.0.0.2:9000", "http://10.0.0.2:9000/v1/chat/completions")
    # an OpenAI client's base URL (with /v1) works as well as the server root; --endpoint wins over the default
    for base in ("http://h:1/v1", "http://h:1/", "http://h:1"):
        assert serve_args.urls(bench_args("serve", "--base-url", base)) == ("http://h:1", "http://h:1/v1/completions")
    custom = bench_args("serve", "--base-url", "http://h:1", "--endpoint", "v1/chat/completions")
    assert serve_args.urls(custom)[1] == "http://h:1/v1/chat/completions"


def test_old_serve_spellings_still_work(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        args = bench_args("serve", "--dataset", "shared-prefix", "--shared-prefix-len", "7", "--shared-suffix-len",
                          "3", "--shared-prefix-groups", "2", "--percentiles", "50,90")
    assert args.dataset_name == "shared-prefix" and "--dataset is deprecated" in caplog.text
    assert (args.prefix_repetition_prefix_len, args.prefix_repetition_suffix_len) == (7, 3)
    assert args.prefix_repetition_num_prefixes == 2 and args.percentiles == "50,90"
    assert bench_args("serve", "--metric-percentiles", "95").percentiles == "95"


@pytest.mark.parametrize(("argv", "flag"), [
    (["--random-range-ratio", "1.0"], "--random-range-ratio"), (["--num-prompts", "0"], "--num-prompts"),
    (["--request-rate", "0"], "--request-rate"), (["--dataset-path", "x.json"], "--dataset-path"),
    (["--backend", "openai-chat", "--prompt-format", "ids"], "--prompt-format"),
])
def test_bad_serve_values_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        serve_args.check(bench_args("serve", *argv))


def test_save_result_without_a_path_names_the_file_like_vllm(tmp_path) -> None:  # noqa: ANN001
    args = bench_args("serve", "--save-result", "--result-dir", str(tmp_path / "out"), "--request-rate", "4")
    path = serve_args.result_path(args, "org/My-Model")
    assert path.startswith(str(tmp_path / "out") + "/openai-4qps-My-Model-") and path.endswith(".json")
    assert serve_args.result_path(bench_args("serve", "--save-result", "r.json"), "m") == "r.json"
    assert serve_args.result_path(bench_args("serve"), "m") is None


def test_throughput_takes_every_engine_flag() -> None:
    assert {f.option for f in engine_flags()} | {"-tp", "-pp", "--no-prefix-caching"} <= option_strings("throughput")


def test_throughput_engine_defaults_and_old_spellings() -> None:
    def config(*argv: str, preset: bool = True) -> EngineConfig:
        kwargs = throughput.engine_args(bench_args("throughput", *argv), "cpu", preset)
        return EngineConfig.from_kwargs("m", **kwargs)

    # unset engine flags keep the engine's defaults (256 sequences, 0.9 of the GPU, prefix caching on); a preset
    # has no weights, so dummy ones unless --load-format says otherwise
    assert config() == EngineConfig("m", device="cpu", load_format="dummy")
    assert (config().max_num_seqs, config().gpu_memory_utilization, config().enable_prefix_caching) == (256, 0.9, True)
    assert config(preset=False).load_format == "auto" and config("--load-format", "auto").load_format == "auto"
    for spelling, on in (("--enable-prefix-caching", True), ("--no-enable-prefix-caching", False),
                         ("--no-prefix-caching", False)):  # the last: the old spelling
        assert config(spelling).enable_prefix_caching is on
    parallel = config("-tp", "2", "-pp", "3")
    assert (parallel.tensor_parallel_size, parallel.pipeline_parallel_size) == (2, 3)
    args = bench_args("throughput", "--n", "3", "--seed", "5", "--dataset-name", "random")
    assert (args.n, args.seed, args.dataset_name, args.max_model_len) == (3, 5, "random", None)
    assert bench_args("throughput").seed == 0  # the workload's, whatever the engine's default
    kwargs = throughput.engine_args(bench_args("throughput", "--seed", "5"), "cpu", True)
    assert kwargs["seed"] == 5 and "max_model_len" not in kwargs


def test_fit_lengths_shrinks_defaults_and_keeps_given_lengths() -> None:
    rng = random.Random(0)
    for _ in range(300):
        budget = rng.randint(4, 5000)
        stretch = 1 + rng.choice([0.0, 0.25, 0.5, 0.9])
        given = rng.choice([None, rng.randint(1, 100)])
        parts = [lengths.Length("--in", given, rng.randint(1, 4096)),
                 lengths.Length("--out", None, rng.randint(1, 512))]
        try:
            chosen = lengths.fit_lengths(parts, budget, stretch)
        except ValueError as exc:
            assert "--in" in str(exc) and str(budget) in str(exc)
            # only a given length leaving no token for the output is refused
            assert given is not None and math.floor(given * stretch) + 1 > budget
            continue
        assert sum(math.floor(n * stretch) for n in chosen) <= budget
        assert all(n >= 1 for n in chosen)
        if given is not None:
            assert chosen[0] == given
        elif sum(math.floor(p.default * stretch) for p in parts) <= budget:
            assert chosen == [p.default for p in parts]  # defaults that fit are kept
    with pytest.raises(ValueError, match="--random-input-len 100"):
        lengths.fit_lengths([lengths.Length("--random-input-len", 100, 1024)], 48)
    assert lengths.fit_lengths([lengths.Length("--a", None, 1024)], None) == [1024]


def test_prompt_maker_ids_stay_inside_the_vocabulary_and_skip_special_tokens() -> None:
    maker = PromptMaker.from_ids(300, seed=1, special_ids=frozenset({0, 299}))
    ids = [t for _ in range(50) for t in maker.tokens(40)]
    assert all(0 < t < 299 for t in ids) and len(set(ids)) > 100
    words = PromptMaker.from_words(seed=1, tokens_per_word=2.0)
    request = words.request(words.tokens(40), 8)
    assert len(request.prompt.split()) == 20 and all(w in COMMON_WORDS for w in request.prompt.split())


class _StubServer(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server's discovery routes, answering as vLLM's do (or 404 where routes say so)."""

    routes: dict[str, tuple[int, dict]] = {}

    def do_GET(self) -> None:  # noqa: N802
        status, body = self.routes.get(self.path, (404, {"detail": "Not Found"}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[tuple[str, dict]]:
    routes: dict[str, tuple[int, dict]] = {}
    handler = type("Handler", (_StubServer,), {"routes": routes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()


def test_discover_reads_context_and_vocabulary(stub: tuple[str, dict]) -> None:
    url, routes = stub
    routes["/v1/models"] = (200, {"object": "list", "data": [{"id": "a", "max_model_len": 2048},
                                                             {"id": "b", "max_model_len": 512}]})
    routes["/tokenizer_info"] = (200, {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072,
                                       "vocab_size": 1000, "added_tokens_decoder": {
                                           "998": {"content": "<|im_start|>", "special": True},
                                           "999": {"content": "<|endoftext|>", "special": True}}})
    info = discover(url, None, None, 10.0)
    assert (info.model, info.max_model_len, info.vocab_size, info.special_ids) == ("a", 2048, 1000,
                                                                                  frozenset({998, 999}))
    assert discover(url, None, "b", 10.0).max_model_len == 512
    with pytest.raises(ServerError, match="does not serve --model 'c'; it serves 'a', 'b'"):
        discover(url, None, "c", 10.0)
    args = bench_args("serve", "--base-url", url)
    maker, source = serve._prompt_maker(args, info, None, None)
    assert maker.exact and "/tokenizer_info" in source
    assert all(t < 998 for t in maker.tokens(5000))


def test_without_tokenizer_info_prompts_are_common_words(stub: tuple[str, dict]) -> None:
    url, routes = stub
    routes["/v1/models"] = (200, {"object": "list", "data": [{"id": "m", "max_model_len": 100}]})
    info = discover(url, None, None, 10.0)
    assert info.vocab_size is None and info.max_model_len == 100
    maker, source = serve._prompt_maker(bench_args("serve", "--base-url", url), info, None, None)
    assert not maker.exact and "common English words" in source
    counted, _ = serve._prompt_maker(bench_args("serve"), info, None,
                                     lambda texts: [3 * len(t.split()) for t in texts])  # 3 tokens a word
    assert counted.tokens_per_word == 3.0
    # vLLM's /tokenizer_info is tokenizer_config.json (special tokens by id as their text), with no vocabulary size:
    # the special ids are known, the id range is not, so prompts stay words
    routes["/tokenizer_info"] = (200, {"tokenizer_class": "Qwen2TokenizerFast", "model_max_length": 1024,
                                       "added_tokens_decoder": {"477": "<|endoftext|>", "478": "<|im_start|>"}})
    info = discover(url, None, None, 10.0)
    assert info.vocab_size is None and info.special_ids == frozenset({477, 478})
    assert not serve._prompt_maker(bench_args("serve"), info, None, None)[0].exact


def test_a_server_that_refuses_the_key_is_a_server_error(stub: tuple[str, dict]) -> None:
    url, routes = stub
    routes["/v1/models"] = (401, {"error": {"message": "missing or invalid API key", "code": 401}})
    with pytest.raises(ServerError, match="HTTP 401.*--api-key"):
        discover(url, None, None, 10.0)


def test_general_lengths_stand_for_the_dataset_ones() -> None:
    args = bench_args("serve", "--input-len", "7", "--output-len", "3")
    assert serve._given(args, "random_input_len", "input_len") == lengths.Length("--input-len", 7, 1024)
    assert serve._given(args, "random_output_len", "output_len").value == 3
    both = bench_args("serve", "--input-len", "7", "--random-input-len", "9")
    assert serve._given(both, "random_input_len", "input_len") == lengths.Length("--random-input-len", 9, 1024)
