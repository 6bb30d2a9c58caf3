"""Measuring for the gates: comparison counts from the store (the fleet's sums), and the
primary backends' answers from the instance's own metrics, each as a window since a start.

Store counts only grow (until `clear()`), so a stage's window is "now minus the counts when
the stage began", and that baseline travels in the shared migration state: whichever instance
judges the gates sees the same window. The request figures are the driving instance's own
(counters in memory, summed over its workers); their window starts when the step began or when
this instance took the lease, whichever is later (docs/decisions.md, "Flip figures").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from shadowlane.migrate.gates import BackendFigures, RouteFigures
from shadowlane.store import Store

#: a backend's answers: by status code, and cumulative duration buckets by upper bound
Answers = tuple[dict[str, float], dict[float, float]]


def comparison_counts(store: Store, routes: Iterable[str], target: str) -> dict[str, Any]:
    """route -> [compared, differing, {field: raw}] for the copies of `routes` to `target`
    (blocking: call it off the loop)."""
    out: dict[str, Any] = {}
    for route in routes:
        totals = store.totals(route, target)
        compared = sum(t.compared for t in totals)
        differing = sum(t.differing for t in totals)
        fields = {f.field: f.raw for f in store.field_counts(route, target)}
        out[route] = [compared, differing, fields]
    return out


def route_figures(now: dict[str, Any], baseline: dict[str, Any]) -> dict[str, RouteFigures]:
    """The window's counts per route: `now` minus `baseline` (a counter reset, as after the
    store was cleared, counts from zero)."""
    out: dict[str, RouteFigures] = {}
    for route, (compared, differing, fields) in now.items():
        base = baseline.get(route) or [0, 0, {}]
        b_compared, b_differing, b_fields = int(base[0]), int(base[1]), dict(base[2])
        if compared < b_compared:
            b_compared, b_differing, b_fields = 0, 0, {}
        out[route] = RouteFigures(
            compared - b_compared,
            max(0, differing - b_differing),
            {
                path: raw - int(b_fields.get(path, 0))
                for path, raw in fields.items()
                if raw - int(b_fields.get(path, 0)) > 0
            },
        )
    return out


def _is_error(code: str) -> bool:
    return code.startswith("5")


def p99(buckets: dict[float, float]) -> float | None:
    """The 99th percentile from cumulative bucket counts: the upper bound of the bucket that
    holds it (the last finite bound when it is in +Inf)."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = 0.99 * total
    finite = [b for b in bounds if not math.isinf(b)]
    for bound in bounds:
        if buckets[bound] >= rank:
            return bound if not math.isinf(bound) else (finite[-1] if finite else None)
    return None


def window(now: Answers, start: Answers | None) -> BackendFigures:
    """A backend's answers between two readings of its counters."""
    codes, buckets = now
    s_codes, s_buckets = start if start is not None else ({}, {})
    diff_codes = {c: n - s_codes.get(c, 0.0) for c, n in codes.items()}
    diff_buckets = {b: n - s_buckets.get(b, 0.0) for b, n in buckets.items()}
    requests = int(sum(diff_codes.values()))
    errors = int(sum(n for c, n in diff_codes.items() if _is_error(c)))
    return BackendFigures(requests, errors, p99(diff_buckets))
