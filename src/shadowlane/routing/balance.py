"""Smooth weighted round robin (nginx's `ngx_http_upstream_get_peer`), for canary splits.

Chosen over random picks because it is deterministic and exact over short windows: 90/10 gives
exactly 9:1 in every 10 picks, interleaved (a,a,a,a,b,a,...) rather than bunched, so a small
canary sees a steady trickle and tests can assert exact counts. Weight 0 legs are never picked.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SmoothWeighted"]


class SmoothWeighted:
    """Picks names in proportion to integer weights; not thread-safe (one per event loop)."""

    __slots__ = ("_current", "_names", "_total", "_weights")

    def __init__(self, legs: Sequence[tuple[str, int]]) -> None:
        self._names: list[str] = []
        self._weights: list[int] = []
        self._current: list[int] = []
        self._total = 0
        self.reset(legs)

    def reset(self, legs: Sequence[tuple[str, int]]) -> None:
        """Replace the weights and restart the cycle (state from old weights would skew it)."""
        if not legs or any(w < 0 for _, w in legs) or sum(w for _, w in legs) == 0:
            raise ValueError("weights must be >= 0 and not all 0")
        self._names = [n for n, _ in legs]
        self._weights = [w for _, w in legs]
        self._current = [0] * len(legs)
        self._total = sum(self._weights)

    def pick(self) -> str:
        current, weights = self._current, self._weights
        best = 0
        best_value = None
        for i, weight in enumerate(weights):
            if weight == 0:
                continue
            value = current[i] + weight
            current[i] = value
            if best_value is None or value > best_value:
                best, best_value = i, value
        current[best] -= self._total
        return self._names[best]

    def weights(self) -> dict[str, int]:
        return dict(zip(self._names, self._weights, strict=True))
