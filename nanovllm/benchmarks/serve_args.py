"""``nanovllm bench serve``'s flags, spelled as vLLM's ``vllm bench serve`` spells them, with their old names kept.

Length flags default to None ("not given"): their defaults (``LENGTH_DEFAULTS``) shrink to fit the served model's
``max_model_len``, while lengths the user gave are kept or refused (``lengths.py``). Old spellings still work:
``--dataset`` (deprecated: ``--dataset-name``), ``--dataset-name shared-prefix`` and its ``--shared-prefix-*`` flags
(now ``prefix_repetition`` and ``--prefix-repetition-*``), ``--percentiles`` (``--metric-percentiles``).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from datetime import datetime
from typing import Any

from nanovllm.benchmarks.serve_client import BACKENDS, DEFAULT_ENDPOINTS

logger = logging.getLogger(__name__)

DATASETS = ("random", "sharegpt", "prefix_repetition", "shared-prefix", "incast")
LENGTH_DEFAULTS = {
    "random_input_len": 1024, "random_output_len": 128,
    "prefix_repetition_prefix_len": 256, "prefix_repetition_suffix_len": 256, "prefix_repetition_output_len": 128,
    "incast_background_input_len": 32, "incast_background_output_len": 20,
    "incast_burst_input_len": 1000, "incast_burst_output_len": 16,
}


class _DeprecatedDataset(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        logger.warning("--dataset is deprecated: use --dataset-name (as vLLM spells it)")
        namespace.dataset_name = values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--backend", choices=BACKENDS, default="openai",
                        help="openai: the completions API; openai-chat: the chat completions API (text prompts as one "
                             "user message); vllm: same as openai")
    server.add_argument("--base-url", default=None,
                        help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is dropped); default: "
                             "http://HOST:PORT")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", default=None,
                        help=f"API path; default per backend: {DEFAULT_ENDPOINTS['openai']} or "
                             f"{DEFAULT_ENDPOINTS['openai-chat']}")
    server.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    server.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=DATASETS, default="random",
                      help="random: random lengths around a mean; sharegpt: a local ShareGPT JSON file "
                           "(--dataset-path); prefix_repetition: groups of requests sharing a prefix (what a prefix "
                           "cache is for); incast: short streams while a burst of long prompts arrives (what chunked "
                           "prefill is for). shared-prefix is the old name of prefix_repetition")
    data.add_argument("--dataset", choices=DATASETS, dest="dataset_name", action=_DeprecatedDataset,
                      help=argparse.SUPPRESS)
    data.add_argument("--dataset-path", default=None, help="the ShareGPT JSON file for --dataset-name sharegpt")
    data.add_argument("--num-prompts", type=int, default=200)
    data.add_argument("--seed", type=int, default=0, help="seeds the prompts, lengths and arrival times")
    data.add_argument("--tokenizer", default=None,
                      help="local tokenizer directory: prompts from its vocabulary, ShareGPT lengths counted with it "
                           "(default: the server's /tokenizer_info and /tokenize)")
    data.add_argument("--vocab-size", type=int, default=None,
                      help="draw prompt token ids below this (default: the vocabulary the server reports)")
    data.add_argument("--prompt-format", choices=["ids", "text"], default=None,
                      help="ids: token ids (exact lengths; the completions API only); text: decoded text "
                           "(default: ids where the vocabulary is known, else text)")
    data.add_argument("--input-len", type=int, default=None, help="same as --random-input-len")
    data.add_argument("--output-len", type=int, default=None,
                      help="output length for every dataset (--random-output-len, --sharegpt-output-len, ...)")
    data.add_argument("--random-input-len", type=int, default=None,
                      help=f"mean prompt length (default {LENGTH_DEFAULTS['random_input_len']}, less if the model's "
                           "context is shorter)")
    data.add_argument("--random-output-len", type=int, default=None,
                      help=f"mean output length (default {LENGTH_DEFAULTS['random_output_len']}, less if the model's "
                           "context is shorter)")
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="lengths uniform in mean * [1 - r, 1 + r], r in [0, 1)")
    data.add_argument("--sharegpt-output-len", type=int, default=None,
                      help="fixed output length (default: the length of each conversation's reply)")
    data.add_argument("--prefix-repetition-prefix-len", "--shared-prefix-len", type=int, default=None,
                      help=f"default {LENGTH_DEFAULTS['prefix_repetition_prefix_len']}")
    data.add_argument("--prefix-repetition-suffix-len", "--shared-suffix-len", type=int, default=None,
                      help=f"default {LENGTH_DEFAULTS['prefix_repetition_suffix_len']}")
    data.add_argument("--prefix-repetition-num-prefixes", "--shared-prefix-groups", type=int, default=10)
    data.add_argument("--prefix-repetition-output-len", type=int, default=None,
                      help="default: --random-output-len when given, else "
                           f"{LENGTH_DEFAULTS['prefix_repetition_output_len']}")
    data.add_argument("--incast-background", type=int, default=8, help="concurrent short streaming clients")
    data.add_argument("--incast-background-input-len", type=int, default=None)
    data.add_argument("--incast-background-output-len", type=int, default=None)
    data.add_argument("--incast-burst", type=int, default=16, help="long prompts arriving at once")
    data.add_argument("--incast-burst-input-len", type=int, default=None)
    data.add_argument("--incast-burst-output-len", type=int, default=None)
    data.add_argument("--incast-warmup", type=float, default=3.0, help="seconds of background before the burst")
    data.add_argument("--incast-cooldown", type=float, default=2.0, help="seconds of background after it")

    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="requests/s (Poisson, or gamma with --burstiness); inf: all at once")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of gaps (1: Poisson)")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                      help="generate every output to its full length (default: on)")

    out = parser.add_argument_group("results")
    out.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                     help="SLOs, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2el)")
    out.add_argument("--metric-percentiles", "--percentiles", dest="percentiles", default="99",
                     help="comma-separated, besides mean and median")
    out.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    out.add_argument("--save-result", nargs="?", const="", default=None, metavar="PATH.json",
                     help="write the results as JSON: to PATH, or (without one) to --result-dir/--result-filename")
    out.add_argument("--save-detailed", action="store_true",
                     help="with --save-result: also each request's lengths, TTFT, inter-token gaps and error")
    out.add_argument("--result-dir", default=None)
    out.add_argument("--result-filename", default=None)
    out.add_argument("--plot", default=None, metavar="PATH.png", help="default: next to --save-result")


def check(args: argparse.Namespace) -> None:
    """Values argparse cannot check alone; a ValueError names the flag."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    if not 0 <= args.random_range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if args.request_rate <= 0:
        raise ValueError(f"--request-rate must be positive (inf: all at once), got {args.request_rate}")
    if args.burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {args.burstiness}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if args.vocab_size is not None and args.vocab_size < 2:
        raise ValueError(f"--vocab-size must be at least 2, got {args.vocab_size}")
    if args.prefix_repetition_num_prefixes < 1:
        raise ValueError(f"--prefix-repetition-num-prefixes must be at least 1, got "
                         f"{args.prefix_repetition_num_prefixes}")
    if args.dataset_path and args.dataset_name != "sharegpt":
        raise ValueError(f"--dataset-path is read by --dataset-name sharegpt only, not {args.dataset_name}")
    if args.backend == "openai-chat" and args.prompt_format == "ids":
        raise ValueError("--prompt-format ids needs the completions API: the chat API (--backend openai-chat) takes "
                         "text")


def urls(args: argparse.Namespace) -> tuple[str, str]:
    """(server root, request URL) from --base-url or --host/--port, and --endpoint."""
    endpoint = args.endpoint or DEFAULT_ENDPOINTS[args.backend]
    if not endpoint.startswith("/"):
        endpoint = "/" + endpoint
    root = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    if root.endswith("/v1"):  # an OpenAI client's base URL; the endpoints and /v1/models already say /v1
        root = root[:-len("/v1")]
    return root, root + endpoint


def result_path(args: argparse.Namespace, model: str) -> str | None:
    if args.save_result is None:
        return None
    if args.save_result:
        return args.save_result
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
    name = args.result_filename or (f"{args.backend}-{rate}qps-{model.rstrip('/').split('/')[-1]}-"
                                    f"{datetime.now():%Y%m%d-%H%M%S}.json")
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        return os.path.join(args.result_dir, name)
    return name
