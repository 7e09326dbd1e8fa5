"""Request lengths that fit the model's context, for the benchmarks' synthetic datasets.

A dataset's lengths come from flags (prompt, prefix, suffix, output...). Each flag left unset takes a default; when
the defaults do not fit ``max_model_len`` they shrink, in proportion, to what the given lengths leave. Lengths the
user gave are never changed: if they alone cannot fit, that is a ``ValueError`` naming the flags and the limit.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Length:
    flag: str  # e.g. "--random-input-len", for messages
    value: int | None  # what the user gave; None: not given
    default: int


def fit_lengths(parts: list[Length], budget: int | None, stretch: float = 1.0, limit_name: str = "max_model_len"
                ) -> list[int]:
    """One length per part, such that the longest draws (``length * stretch``, for lengths drawn up to that factor
    above their mean) sum to at most ``budget`` tokens (None: no limit)."""
    for part in parts:
        if part.value is not None and part.value < 1:
            raise ValueError(f"{part.flag} must be at least 1, got {part.value}")
    chosen = [part.value if part.value is not None else part.default for part in parts]
    if budget is None or _longest(chosen, stretch) <= budget:
        return chosen
    given = [p for p in parts if p.value is not None]
    defaulted = [i for i, p in enumerate(parts) if p.value is None]
    room = budget - _longest([p.value for p in given], stretch)  # type: ignore[misc]
    if defaulted and room >= len(defaulted):
        scale = room / sum(parts[i].default * stretch for i in defaulted)
        for i in defaulted:
            chosen[i] = max(1, math.floor(parts[i].default * scale))
        if _longest(chosen, stretch) <= budget:
            logger.info("lengths shrunk to fit %d tokens (%s): %s", budget, limit_name,
                        ", ".join(f"{parts[i].flag} {chosen[i]}" for i in defaulted))
            return chosen
    spelled = " + ".join(f"{p.flag} {v}" for p, v in zip(parts, chosen))
    factor = f" (x{stretch:g} at most)" if stretch != 1.0 else ""
    raise ValueError(f"{spelled}{factor} need up to {_longest(chosen, stretch)} tokens, more than the {budget} the "
                     f"model's context allows ({limit_name}): give shorter lengths")


def _longest(lengths: list[int], stretch: float) -> int:
    return sum(math.floor(n * stretch) for n in lengths)


def draw_length(rng: random.Random, mean: int, range_ratio: float) -> int:
    """A length uniform in ``mean * [1 - range_ratio, 1 + range_ratio]``, at least 1 (vLLM's random dataset)."""
    low, high = int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))
    return rng.randint(max(low, 1), max(high, 1))
