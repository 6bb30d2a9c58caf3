"""What the comparator hands the store in one write: summed increments plus example pairs.

The comparator decides each job on its own thread and adds it here; only the sums travel to the
database. A batch of 500 jobs on one route with a few differing fields therefore becomes a few
UPSERTs, not 500 row writes, which is what keeps a slow or remote store from being the bottleneck
(and lets many instances add their sums into one PostgreSQL without coordinating).

Divergence ledger entries ride along (`divergences`): they are not sums but records, each
written as it is, in the same transaction as the comparison sums of the same flush.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shadowlane.store.ledger import Divergence

# ---------------------------------------------------------------------------------------------
# Latency buckets: fixed and logarithmic, so any two instances' counts can simply be added.

#: lower edge of bucket 1; everything faster lands in bucket 0
LATENCY_MIN = 1e-5
#: each bucket is 2^(1/8) (~9%) wider than the previous: a percentile read from the buckets is
#: within ~4.5% of the true value, whatever the scale
LATENCY_BASE = 2 ** (1 / 8)
#: bucket index cap: ~ 1e-5 * 2^(240/8) s, about 3 hours
LATENCY_MAX_BUCKET = 240
_LOG_BASE = math.log(LATENCY_BASE)


def latency_bucket(seconds: float) -> int:
    """The bucket of a duration: 0 below 10us, then one per factor 2^(1/8), capped."""
    if seconds < LATENCY_MIN:
        return 0
    index = int(math.log(seconds / LATENCY_MIN) / _LOG_BASE) + 1
    return min(index, LATENCY_MAX_BUCKET)


def bucket_value(index: int) -> float:
    """A representative duration of a bucket: the geometric middle of its two edges."""
    if index <= 0:
        return LATENCY_MIN / 2
    return float(LATENCY_MIN * LATENCY_BASE ** (index - 0.5))


# ---------------------------------------------------------------------------------------------
# Batch


@dataclass(slots=True)
class Example:
    """One request with both answers, kept to show a person what a difference looks like.

    `primary` and `candidate` are `{status, headers, body, truncated}` with text bodies;
    `differing` are the paths where they differ, `noise` those that also differed between
    primary and secondary.
    """

    route: str
    target: str
    ts: float
    request_id: str
    method: str
    uri: str
    request_body: str
    primary: dict[str, Any]
    candidate: dict[str, Any]
    differing: list[str]
    noise: list[str]

    def data(self) -> dict[str, Any]:
        """The part stored as one JSON document (the rest are indexed columns)."""
        return {
            "request_body": self.request_body,
            "primary": self.primary,
            "candidate": self.candidate,
            "differing": self.differing,
            "noise": self.noise,
        }


#: builds an Example only when it is written: most examples are pushed out of a batch by newer
#: ones first, and decoding bodies for those would be wasted work on the comparator thread
ExampleFactory = Callable[[], Example]


@dataclass
class Batch:
    """Increments and examples collected between two flushes."""

    #: examples kept per (route, target, field); the newest win, as in the store
    examples_per_field: int = 5
    #: (route, target) -> [compared, matched, differing, noise]
    totals: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    #: (route, target, field) -> [raw, noise]
    fields: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    #: (route, target, side, bucket) -> count; side is "primary" or "shadow"
    latency: dict[tuple[str, str, str, int], int] = field(default_factory=dict)
    #: (route, target, field) -> newest example factories (index into `_examples`)
    example_refs: dict[tuple[str, str, str], deque[int]] = field(default_factory=dict)
    _examples: dict[int, tuple[float, ExampleFactory]] = field(default_factory=dict)
    #: how many fields' deques still hold each example; at 0 it is forgotten at once, so a
    #: batch holds at most examples_per_field jobs per field, whatever the traffic
    _refs: dict[int, int] = field(default_factory=dict)
    _next_id: int = 0
    #: jobs added since the last flush
    jobs: int = 0
    #: divergence ledger entries recorded since the last flush, in the order they came
    divergences: list[Divergence] = field(default_factory=list)

    def add_total(self, route: str, target: str, result: str) -> None:
        row = self.totals.get((route, target))
        if row is None:
            row = self.totals[(route, target)] = [0, 0, 0, 0]
        row[0] += 1
        if result == "match":
            row[1] += 1
        elif result == "diff":
            row[2] += 1
        elif result == "noise":
            row[3] += 1

    def add_matches(self, route: str, target: str, n: int) -> None:
        """`n` comparisons of (route, target) that matched (decided on the event loop)."""
        row = self.totals.get((route, target))
        if row is None:
            row = self.totals[(route, target)] = [0, 0, 0, 0]
        row[0] += n
        row[1] += n

    def add_field(self, route: str, target: str, path: str, raw: int, noise: int) -> None:
        row = self.fields.get((route, target, path))
        if row is None:
            row = self.fields[(route, target, path)] = [0, 0]
        row[0] += raw
        row[1] += noise

    def add_latency(self, route: str, target: str, side: str, seconds: float) -> None:
        self.add_latency_count(route, target, side, latency_bucket(seconds), 1)

    def add_latency_count(self, route: str, target: str, side: str, bucket: int, n: int) -> None:
        key = (route, target, side, bucket)
        self.latency[key] = self.latency.get(key, 0) + n

    def add_example(
        self, route: str, target: str, paths: list[str], ts: float, factory: ExampleFactory
    ) -> None:
        """Offer one example for each of `paths`; kept only where it is among the newest N."""
        n = self.examples_per_field
        if n <= 0 or not paths:
            return
        paths = list(dict.fromkeys(paths))
        ident = self._next_id
        self._next_id += 1
        self._examples[ident] = (ts, factory)
        self._refs[ident] = len(paths)
        for path in paths:
            refs = self.example_refs.get((route, target, path))
            if refs is None:
                refs = self.example_refs[(route, target, path)] = deque(maxlen=n)
            if len(refs) == n:
                self._release(refs[0])
            refs.append(ident)

    def _release(self, ident: int) -> None:
        left = self._refs[ident] - 1
        if left:
            self._refs[ident] = left
        else:
            del self._refs[ident]
            del self._examples[ident]

    def examples(self) -> list[tuple[Example, list[str]]]:
        """Each kept example, built now, with the fields it is an example of."""
        by_id: dict[int, list[str]] = {}
        for (_route, _target, path), refs in self.example_refs.items():
            for ident in refs:
                by_id.setdefault(ident, []).append(path)
        out: list[tuple[Example, list[str]]] = []
        for ident in sorted(by_id):
            ts, factory = self._examples[ident]
            example = factory()
            example.ts = ts
            out.append((example, sorted(by_id[ident])))
        return out

    def __bool__(self) -> bool:
        return bool(
            self.totals or self.fields or self.latency or self.example_refs or self.divergences
        )
