"""Diffy's analysis step: from the store's sums to what is reported, with rates and percentiles.

Why a module of its own: the store keeps counts, which must add up across batches and instances
and cannot depend on how a reader judges them; the admin API, the dashboard and `report` must all
judge them the same way. This is the one place that does, with `compare.thresholds` from the
config (`CompareThresholds`, whose defaults are the only ones).

The shape follows Diffy's `analysis/`: `JoinedDifferences` joins the raw and the noise counter of
each field with its endpoint's total, and `DifferencesFilterFactory(relative, absolute)` decides
which joined fields are real differences. The store already keeps raw and noise in one row per
field (`FieldRow`), so joining is looking up the (route, target)'s compared count.

Nothing here opens a connection or a file: `Analysis` reads through the row source it is given (a
`Store`, or a stand-in in tests) and everything else is a pure function of rows, so the rule can
be tested on numbers alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from shadowlane.config import CompareThresholds
from shadowlane.store import FieldRow, LatencyRow, TotalsRow, bucket_value

__all__ = [
    "SUMMARY_TOP_FIELDS",
    "Analysis",
    "ComparisonRows",
    "field_reports",
    "is_reported",
    "latency_summary",
    "percentile",
    "rate",
    "summarize",
    "top_fields",
]

#: reported fields a summary row lists; the rest are one `fields()` call away
SUMMARY_TOP_FIELDS = 5

#: (route, target)
Pair = tuple[str, str]


def rate(n: int, total: int) -> float:
    """`n / total`, or 0.0 when nothing was compared (an empty pair has no rate, not NaN)."""
    return n / total if total else 0.0


def is_reported(raw: int, noise: int, compared: int, relative: float, absolute: float) -> bool:
    """Diffy's rule: a field's differences count only if they clearly exceed its noise.

    raw, noise: requests where the field differed primary vs candidate / primary vs secondary;
    compared: all compared requests of the (route, target). Reported iff raw > noise, and the
    relative gap |raw-noise|/(raw+noise)*100 > relative, and the absolute gap
    |raw-noise|/compared*100 > absolute. Neither gap alone is enough: a very noisy field passes
    the absolute test, a field that differed once in a million requests passes the relative one.
    """
    if raw <= noise or compared <= 0:
        return False
    gap = abs(raw - noise)
    return gap / (raw + noise) * 100 > relative and gap / compared * 100 > absolute


def percentile(counts: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0..1) of a bucketed distribution, or None when it is empty.

    Read from the store's fixed buckets rather than kept per instance, so the quantile of many
    instances' answers is that of the sum of their counts.
    """
    total = sum(counts.values())
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return bucket_value(index)
    return bucket_value(max(counts))


def field_reports(
    rows: Iterable[FieldRow], compared: Mapping[Pair, int], thresholds: CompareThresholds
) -> dict[Pair, list[dict[str, Any]]]:
    """Per (route, target), its fields with rates and `reported`, as the API shows them.

    Reported fields come first, then the most frequent differences, then by name: a person reads
    the real differences before the noise, and equal data always gives the same output.
    """
    relative, absolute = thresholds.relative, thresholds.absolute
    out: dict[Pair, list[dict[str, Any]]] = {}
    for row in rows:
        total = compared.get((row.route, row.target), 0)
        out.setdefault((row.route, row.target), []).append(
            {
                "field": row.field,
                "raw": row.raw,
                "noise": row.noise,
                "raw_rate": rate(row.raw, total),
                "noise_rate": rate(row.noise, total),
                "reported": is_reported(row.raw, row.noise, total, relative, absolute),
            }
        )
    for fields in out.values():
        fields.sort(key=lambda f: (not f["reported"], -f["raw"], f["field"]))
    return out


def top_fields(
    fields: Iterable[Mapping[str, Any]], n: int = SUMMARY_TOP_FIELDS
) -> list[dict[str, Any]]:
    """The first `n` reported fields of a sorted `field_reports` list, rates only."""
    reported = [
        {"field": f["field"], "raw_rate": f["raw_rate"], "noise_rate": f["noise_rate"]}
        for f in fields
        if f["reported"]
    ]
    return reported[:n]


def latency_summary(rows: Iterable[LatencyRow]) -> dict[Pair, dict[str, float | None]]:
    """Per (route, target) with latency data: p50 and p99 of each side, in seconds."""
    buckets: dict[Pair, dict[str, dict[int, int]]] = {}
    for row in rows:
        sides = buckets.setdefault((row.route, row.target), {})
        side = sides.setdefault(row.side, {})
        side[row.bucket] = side.get(row.bucket, 0) + row.n
    return {pair: _latency(sides) for pair, sides in buckets.items()}


def _latency(sides: Mapping[str, Mapping[int, int]]) -> dict[str, float | None]:
    primary = sides.get("primary", {})
    shadow = sides.get("shadow", {})
    return {
        "primary_p50": percentile(primary, 0.5),
        "primary_p99": percentile(primary, 0.99),
        "shadow_p50": percentile(shadow, 0.5),
        "shadow_p99": percentile(shadow, 0.99),
    }


def summarize(
    totals: Iterable[TotalsRow],
    fields: Iterable[FieldRow],
    latency: Iterable[LatencyRow],
    thresholds: CompareThresholds,
) -> list[dict[str, Any]]:
    """Per (route, target), in the order of `totals`: counts, rates, latency percentiles and the
    top reported fields.

    The order is the store's (`ORDER BY route, target` in the database's collation), kept rather
    than re-sorted here so the output does not depend on where the rows were sorted.
    """
    totals = list(totals)
    reports = field_reports(fields, {(t.route, t.target): t.compared for t in totals}, thresholds)
    latencies = latency_summary(latency)
    return [
        {
            "route": t.route,
            "target": t.target,
            "compared": t.compared,
            "matched": t.matched,
            "differing": t.differing,
            "noise": t.noise,
            "diff_rate": rate(t.differing, t.compared),
            "noise_rate": rate(t.noise, t.compared),
            "latency": latencies.get((t.route, t.target)) or _latency({}),
            "top_fields": top_fields(reports.get((t.route, t.target), [])),
        }
        for t in totals
    ]


class ComparisonRows(Protocol):
    """The rows the analysis reads: what a `Store` returns. Callable from any thread."""

    def totals(self, route: str | None = None, target: str | None = None) -> list[TotalsRow]: ...

    def field_counts(
        self, route: str | None = None, target: str | None = None
    ) -> list[FieldRow]: ...

    def latency_counts(
        self, route: str | None = None, target: str | None = None
    ) -> list[LatencyRow]: ...

    def examples(
        self, route: str, target: str, field: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]: ...


class Analysis:
    """A row source judged by one set of thresholds: the query side of the admin API (it has
    `summary`, `fields` and `examples`), the dashboard and `report`.

    The thresholds are fixed at construction, as the store's rows are those of one running
    comparator: a reload that changes `compare.thresholds` takes a restart, like the rest of it.
    """

    def __init__(self, rows: ComparisonRows, thresholds: CompareThresholds | None = None) -> None:
        self.rows = rows
        self.thresholds = thresholds if thresholds is not None else CompareThresholds()

    def summary(self) -> list[dict[str, Any]]:
        """Per (route, target): see `summarize`."""
        rows = self.rows
        return summarize(rows.totals(), rows.field_counts(), rows.latency_counts(), self.thresholds)

    def fields(self, route: str, target: str) -> list[dict[str, Any]]:
        """Every field of one (route, target) that ever differed: see `field_reports`."""
        totals = self.rows.totals(route, target)
        compared = {(route, target): totals[0].compared if totals else 0}
        reports = field_reports(self.rows.field_counts(route, target), compared, self.thresholds)
        return reports.get((route, target), [])

    def examples(
        self, route: str, target: str, field: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        """Newest example pairs, as stored: an example is evidence, there is nothing to judge."""
        return self.rows.examples(route, target, field, limit)
