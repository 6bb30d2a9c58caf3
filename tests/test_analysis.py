"""Diffy's analysis step on rows alone: the reporting rule, rates, order, top fields, percentiles.

No database here: the rows are written out, so each case reads as the numbers it is about. The
same analysis on real stores is in test_store.py, and its rendering in test_report.py.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson
import pytest

from shadowlane.compare.analysis import (
    SUMMARY_TOP_FIELDS,
    Analysis,
    field_reports,
    is_reported,
    latency_summary,
    percentile,
    rate,
    summarize,
)
from shadowlane.config import CompareConfig, CompareThresholds
from shadowlane.store import FieldRow, LatencyRow, TotalsRow, bucket_value, latency_bucket

DEFAULTS = CompareThresholds()

# ---------------------------------------------------------------------------------------------
# Thresholds (Diffy's rule)


@pytest.mark.parametrize(
    ("raw", "noise", "compared", "reported"),
    [
        (100, 0, 100, True),  # always differs, never noisy
        (100, 100, 100, False),  # random in every answer: pure noise
        (100, 90, 100, False),  # relative gap 10/190 = 5% <= 20%
        (100, 50, 100, True),  # relative 50/150 = 33%, absolute 50%
        (50, 60, 100, False),  # raw <= noise
        (1, 0, 100_000, False),  # absolute 0.001% <= 0.03%
        (40, 0, 100_000, True),  # absolute 0.04% > 0.03%
        (0, 0, 0, False),
    ],
)
def test_thresholds(raw: int, noise: int, compared: int, reported: bool) -> None:
    assert is_reported(raw, noise, compared, 20.0, 0.03) is reported


@pytest.mark.parametrize(
    ("field", "raw", "noise", "reported"),
    [
        ("body.price", 120, 0, True),
        ("body.request_uuid", 1000, 1000, False),
        ("headers.etag", 1000, 985, False),
        ("body.items[2].sku", 60, 40, False),  # relative exactly 20: must be *above*
        ("body.discount", 90, 20, True),
    ],
)
def test_the_worked_example_of_the_docs(field: str, raw: int, noise: int, reported: bool) -> None:
    """docs/comparison.md section 5: 1000 compared requests on orders -> orders-v2."""
    [row] = field_reports(
        [FieldRow("orders", "v2", field, raw, noise)], {("orders", "v2"): 1000}, DEFAULTS
    )[("orders", "v2")]
    assert row["reported"] is reported


def test_threshold_edges() -> None:
    # absolute exactly 0.03% (3 in 10,000) is not above it; 4 in 10,000 is
    assert not is_reported(3, 0, 10_000, 20.0, 0.03)
    assert is_reported(4, 0, 10_000, 20.0, 0.03)
    # relative exactly 20% (60 vs 40) is not above it; 61 vs 40 is
    assert not is_reported(60, 40, 100, 20.0, 0.03)
    assert is_reported(61, 40, 100, 20.0, 0.03)
    # raw must exceed noise even with zero thresholds
    assert not is_reported(5, 5, 10, 0.0, 0.0)
    assert is_reported(6, 5, 10, 0.0, 0.0)
    # nothing compared (fields without totals): never reported, never a division by zero
    assert not is_reported(5, 0, 0, 0.0, 0.0)


def test_thresholds_are_a_parameter_with_the_configs_defaults() -> None:
    assert (DEFAULTS.relative, DEFAULTS.absolute) == (20.0, 0.03)
    assert CompareConfig().thresholds == DEFAULTS
    assert Analysis(Rows()).thresholds == DEFAULTS
    rows = [FieldRow("r", "t", "body.a", 2, 0)]
    compared = {("r", "t"): 100_000}
    assert not field_reports(rows, compared, DEFAULTS)[("r", "t")][0]["reported"]
    strict = CompareThresholds(relative=0, absolute=0)
    assert field_reports(rows, compared, strict)[("r", "t")][0]["reported"]
    analysis = Analysis(Rows(totals=[TotalsRow("r", "t", 100_000, 0, 2, 0)], fields=rows), strict)
    assert analysis.fields("r", "t")[0]["reported"]
    assert analysis.summary()[0]["top_fields"][0]["field"] == "body.a"


# ---------------------------------------------------------------------------------------------
# Rates, order, top fields


def test_rates() -> None:
    assert rate(1, 4) == 0.25
    assert rate(0, 4) == 0.0
    assert rate(3, 0) == 0.0  # nothing compared: no rate rather than a division by zero


def test_fields_reported_first_then_by_count_then_by_name() -> None:
    rows = [
        FieldRow("r", "t", "body.noisy", 90, 90),
        FieldRow("r", "t", "body.b", 10, 0),
        FieldRow("r", "t", "body.a", 10, 0),
        FieldRow("r", "t", "body.big", 40, 0),
        FieldRow("r", "t", "body.quiet", 95, 94),
        FieldRow("other", "t", "body.x", 1, 0),
    ]
    out = field_reports(rows, {("r", "t"): 100}, DEFAULTS)
    assert [f["field"] for f in out[("r", "t")]] == [
        "body.big",
        "body.a",
        "body.b",
        "body.quiet",
        "body.noisy",
    ]
    # a field of a pair without totals: rates 0, not reported
    assert out[("other", "t")] == [
        {
            "field": "body.x",
            "raw": 1,
            "noise": 0,
            "raw_rate": 0.0,
            "noise_rate": 0.0,
            "reported": False,
        }
    ]


def test_summary_rows_in_the_stores_order_with_top_fields() -> None:
    # not sorted by Python: the store's ORDER BY (its collation) decides
    totals = [TotalsRow("b", "t", 10, 5, 5, 0), TotalsRow("a", "t", 0, 0, 0, 0)]
    fields = [FieldRow("b", "t", f"body.f{i}", 10 - i, 0) for i in range(7)]
    fields.append(FieldRow("b", "t", "body.noise", 10, 10))
    [b, a] = summarize(totals, fields, [], DEFAULTS)
    assert (b["route"], a["route"]) == ("b", "a")
    assert len(b["top_fields"]) == SUMMARY_TOP_FIELDS == 5
    assert [f["field"] for f in b["top_fields"]] == [f"body.f{i}" for i in range(5)]
    assert b["top_fields"][0] == {"field": "body.f0", "raw_rate": 1.0, "noise_rate": 0.0}
    assert (b["diff_rate"], b["noise_rate"]) == (0.5, 0.0)
    assert a == {
        "route": "a",
        "target": "t",
        "compared": 0,
        "matched": 0,
        "differing": 0,
        "noise": 0,
        "diff_rate": 0.0,
        "noise_rate": 0.0,
        "latency": {
            "primary_p50": None,
            "primary_p99": None,
            "shadow_p50": None,
            "shadow_p99": None,
        },
        "top_fields": [],
    }


def test_the_json_documents_keep_their_key_order() -> None:
    """The API and `report --format json` are these dicts serialised: key order is output."""
    rows = Rows(
        totals=[TotalsRow("r", "t", 4, 1, 2, 1)],
        fields=[FieldRow("r", "t", "body.a", 2, 0)],
        latency=[LatencyRow("r", "t", "primary", 0, 4)],
    )
    analysis = Analysis(rows)
    p = bucket_value(0)
    assert orjson.dumps(analysis.summary()) == (
        b'[{"route":"r","target":"t","compared":4,"matched":1,"differing":2,"noise":1,'
        b'"diff_rate":0.5,"noise_rate":0.25,"latency":{"primary_p50":' + orjson.dumps(p) + b","
        b'"primary_p99":' + orjson.dumps(p) + b',"shadow_p50":null,"shadow_p99":null},'
        b'"top_fields":[{"field":"body.a","raw_rate":0.5,"noise_rate":0.0}]}]'
    )
    assert orjson.dumps(analysis.fields("r", "t")) == (
        b'[{"field":"body.a","raw":2,"noise":0,"raw_rate":0.5,"noise_rate":0.0,"reported":true}]'
    )
    assert analysis.fields("nope", "t") == []
    assert rows.calls == [
        ("totals", None, None),
        ("field_counts", None, None),
        ("latency_counts", None, None),
        ("totals", "r", "t"),
        ("field_counts", "r", "t"),
        ("totals", "nope", "t"),
        ("field_counts", "nope", "t"),
    ]


def test_examples_pass_through_unjudged() -> None:
    rows = Rows()
    assert Analysis(rows).examples("r", "t", "body.a", 3) == [{"id": 1}]
    assert rows.calls == [("examples", "r", "t", "body.a", 3)]


# ---------------------------------------------------------------------------------------------
# Percentiles


def test_percentiles_of_buckets() -> None:
    assert percentile({}, 0.5) is None
    assert percentile({7: 0}, 0.5) is None
    assert percentile({latency_bucket(2.0): 1}, 0.99) == pytest.approx(2.0, rel=0.05)
    ten, fifty = latency_bucket(0.010), latency_bucket(0.050)
    counts = {ten: 99, fifty: 1}
    assert percentile(counts, 0.5) == pytest.approx(0.010, rel=0.05)
    assert percentile(counts, 0.99) == pytest.approx(0.010, rel=0.05)  # rank 99 is still 10 ms
    assert percentile(counts, 1.0) == pytest.approx(0.050, rel=0.05)
    assert percentile(counts, 0.0) == bucket_value(ten)
    assert percentile({ten: 1, fifty: 1}, 0.5) == bucket_value(ten)  # the lower of a tie


def test_latency_per_pair_and_side() -> None:
    rows = [
        LatencyRow("r", "t", "primary", latency_bucket(0.01), 3),
        LatencyRow("r", "t", "shadow", latency_bucket(0.04), 3),
        LatencyRow("r", "u", "shadow", latency_bucket(1.0), 1),
    ]
    lat = latency_summary(rows)
    assert set(lat) == {("r", "t"), ("r", "u")}
    assert lat[("r", "t")]["primary_p50"] == pytest.approx(0.01, rel=0.05)
    assert lat[("r", "t")]["shadow_p99"] == pytest.approx(0.04, rel=0.05)
    assert lat[("r", "u")]["primary_p50"] is None
    assert lat[("r", "u")]["shadow_p50"] == pytest.approx(1.0, rel=0.05)


# ---------------------------------------------------------------------------------------------
# Layering


def test_the_store_does_not_import_the_analysis() -> None:
    """Imports go down the data path (compare -> store): the store keeps rows, never judges."""
    code = (
        "import sys, shadowlane.store, shadowlane.store.sqlite, shadowlane.store.postgres;"
        "print(sorted(m for m in sys.modules if m.startswith('shadowlane.compare')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------


class Rows:
    """A row source as a `Store` is one; records the calls."""

    def __init__(
        self,
        totals: list[TotalsRow] | None = None,
        fields: list[FieldRow] | None = None,
        latency: list[LatencyRow] | None = None,
    ) -> None:
        self._totals = totals or []
        self._fields = fields or []
        self._latency = latency or []
        self.calls: list[tuple[Any, ...]] = []

    @staticmethod
    def _of(rows: list[Any], route: str | None, target: str | None) -> list[Any]:
        return [
            r
            for r in rows
            if (route is None or r.route == route) and (target is None or r.target == target)
        ]

    def totals(self, route: str | None = None, target: str | None = None) -> list[TotalsRow]:
        self.calls.append(("totals", route, target))
        return self._of(self._totals, route, target)

    def field_counts(self, route: str | None = None, target: str | None = None) -> list[FieldRow]:
        self.calls.append(("field_counts", route, target))
        return self._of(self._fields, route, target)

    def latency_counts(
        self, route: str | None = None, target: str | None = None
    ) -> list[LatencyRow]:
        self.calls.append(("latency_counts", route, target))
        return self._of(self._latency, route, target)

    def examples(
        self, route: str, target: str, field: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        self.calls.append(("examples", route, target, field, limit))
        return [{"id": 1}]
