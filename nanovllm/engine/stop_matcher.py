"""Stop strings, found in a request's text as it grows.

An Aho-Corasick automaton (``pyahocorasick``) over all of a request's stop strings scans each new piece of text
once, so the cost per generated token does not grow with the number of stop strings.
"""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        import ahocorasick

        self.max_len = max(len(stop) for stop in stops)
        self._automaton = ahocorasick.Automaton()
        for stop in stops:
            self._automaton.add_word(stop, stop)
        self._automaton.make_automaton()

    def find(self, text: str, new_from: int) -> tuple[int, str] | None:
        """The first stop string (by where it starts) that ends at or after ``text[new_from]``, and its start.
        A stop string may straddle the old text and the new, so the scan starts ``max_len - 1`` characters back."""
        start = max(0, new_from - self.max_len + 1)
        best: tuple[int, str] | None = None
        for end, stop in self._automaton.iter(text, start):
            begin = end - len(stop) + 1
            if end >= new_from and (best is None or begin < best[0]):
                best = (begin, stop)
        return best
