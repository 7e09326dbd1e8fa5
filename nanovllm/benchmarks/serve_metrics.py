"""Latency and throughput summaries for ``bench serve``, goodput under SLOs, and the optional PNG plot."""
from __future__ import annotations

import logging
import statistics
from typing import Any, Sequence

from nanovllm.benchmarks.serve_client import RequestResult

logger = logging.getLogger(__name__)

SLO_KEYS = ("ttft", "tpot", "e2e")


def parse_slos(specs: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` (milliseconds) -> {"ttft": 0.5, "tpot": 0.05} (seconds). ``e2el`` (vLLM's name)
    is ``e2e``."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        key, _, value = spec.partition(":")
        key = "e2e" if key == "e2el" else key
        try:
            slos[key] = float(value) / 1000.0
        except ValueError:
            key = ""
        if key not in SLO_KEYS:
            raise ValueError(f"--goodput takes KEY:MILLISECONDS with KEY in ttft, tpot, e2el, got {spec!r}")
    return slos


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def distribution(values: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean / median / pXX of ``values`` (seconds) in milliseconds."""
    out = {"mean_ms": 1000 * statistics.fmean(values) if values else 0.0,
           "median_ms": 1000 * percentile(values, 50)}
    for q in percentiles:
        out[f"p{q:g}_ms"] = 1000 * percentile(values, q)
    return out


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    measured = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2e": result.latency}
    return all(measured[key] <= limit for key, limit in slos.items())


def summarize(results: list[RequestResult], duration_s: float, percentiles: Sequence[float],
              slos: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    duration_s = max(duration_s, 1e-9)
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft": distribution([r.ttft for r in ok], percentiles),
        "tpot": distribution([t for r in ok if (t := r.tpot) is not None], percentiles),
        "itl": distribution([gap for r in ok for gap in r.itl], percentiles),
        "e2e": distribution([r.latency for r in ok], percentiles),
    }
    if slos:
        good = sum(meets_slos(r, slos) for r in ok)
        summary["goodput"] = {"slos_ms": {k: v * 1000 for k, v in slos.items()}, "good_requests": good,
                              "request_goodput": good / duration_s}
    errors = sorted({r.error for r in results if not r.success})
    if errors:
        summary["errors"] = errors[:10]
    return summary


def detailed(results: list[RequestResult]) -> dict[str, list[Any]]:
    """Per request, in the order sent (vLLM's ``--save-detailed`` fields)."""
    return {"input_lens": [r.prompt_len for r in results], "output_lens": [r.output_len for r in results],
            "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
            "e2els": [r.latency for r in results], "errors": [r.error for r in results]}


def print_summary(title: str, summary: dict[str, Any]) -> None:
    """The report, for a person reading a terminal."""
    print(f"{'=' * 20} {title} {'=' * 20}")
    print(f"{'Successful requests:':<40}{summary['completed']:>12}")
    print(f"{'Failed requests:':<40}{summary['failed']:>12}")
    print(f"{'Duration (s):':<40}{summary['duration_s']:>12.2f}")
    print(f"{'Total input tokens:':<40}{summary['total_input_tokens']:>12}")
    print(f"{'Total output tokens:':<40}{summary['total_output_tokens']:>12}")
    print(f"{'Request throughput (req/s):':<40}{summary['request_throughput']:>12.2f}")
    print(f"{'Output token throughput (tok/s):':<40}{summary['output_throughput']:>12.2f}")
    print(f"{'Total token throughput (tok/s):':<40}{summary['total_token_throughput']:>12.2f}")
    if "goodput" in summary:
        print(f"{'Request goodput (req/s):':<40}{summary['goodput']['request_goodput']:>12.2f}")
    for key, name in (("ttft", "Time to first token"), ("tpot", "Time per output token (excl. 1st)"),
                      ("itl", "Inter-token latency"), ("e2e", "End-to-end latency")):
        print(f"{'-' * 8} {name} {'-' * 8}")
        for stat, value in summary[key].items():
            print(f"{stat.replace('_ms', ' (ms)') + ':':<40}{value:>12.2f}")
    for error in summary.get("errors", []):
        print(f"error: {error}")


def plot_latencies(results: list[RequestResult], path: str, title: str) -> bool:
    """Histograms of TTFT, TPOT, ITL and E2E to a PNG; False (and a log line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; skipping the latency plot")
        return False
    ok = [r for r in results if r.success]
    series = {
        "TTFT (ms)": [1000 * r.ttft for r in ok],
        "TPOT (ms)": [1000 * t for r in ok if (t := r.tpot) is not None],
        "ITL (ms)": [1000 * g for r in ok for g in r.itl],
        "E2E (ms)": [1000 * r.latency for r in ok],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, series.items()):
        ax.hist(values, bins=50)
        ax.set_xlabel(name)
        ax.set_ylabel("count")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    logger.info("latency plot written to %s", path)
    return True
