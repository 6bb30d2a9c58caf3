"""`shadowlane report`: the comparison summary as a terminal table or as JSON.

The text form answers, per route and shadow target, the questions of a migration review in one
screen: how much was compared, how much really differs (beyond noise), whether the new backend is
slower, and which fields differ, each shown beside its noise so a person can judge the threshold.
The JSON form is the same data as the admin API's summary plus every field of each pair, for
scripts (CI gates such as "no reported field on route X"). Both come from the same `Analysis` as
the API's, so a field reported on the dashboard is reported here.

The divergence ledger follows: per route and target, the open entries by reason and the keys
now suspect (the first `TOP_KEYS` in text, all of them in JSON), so a migration review sees
whether the new backend's data can be trusted before anyone reads a diff rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from shadowlane.compare.analysis import Analysis, ComparisonRows
from shadowlane.store import LedgerQueries

if TYPE_CHECKING:
    from shadowlane.config import CompareThresholds

__all__ = ["ReportRows", "ledger_data", "render_report", "report_data"]

#: reported fields listed per route/target in the text form
TOP_FIELDS = 10
#: suspect keys listed per route/target in the text form
TOP_KEYS = 10


class ReportRows(ComparisonRows, LedgerQueries, Protocol):
    """What the report reads: the comparison rows and the ledger (a `Store` has both)."""


def report_data(
    store: ComparisonRows, thresholds: CompareThresholds | None = None
) -> list[dict[str, Any]]:
    """The summary rows, each with its full `fields` list (reported or not).

    `thresholds` are the config's `compare.thresholds`; None means their defaults.
    """
    analysis = Analysis(store, thresholds)
    rows = analysis.summary()
    for row in rows:
        row["fields"] = analysis.fields(row["route"], row["target"])
    return rows


def ledger_data(store: LedgerQueries) -> dict[str, Any]:
    """The ledger per (route, target): open and resolved entry counts, open entries by reason,
    and every suspect key; `open` is the total of open entries."""
    pairs: dict[tuple[str, str], dict[str, Any]] = {}

    def pair(route: str, target: str) -> dict[str, Any]:
        row = pairs.get((route, target))
        if row is None:
            row = pairs[(route, target)] = {
                "route": route,
                "target": target,
                "open": 0,
                "resolved": 0,
                "reasons": {},
                "suspect_keys": [],
            }
        return row

    for c in store.ledger_counts():
        row = pair(c.route, c.target)
        row["open"] += c.n
        row["reasons"][c.reason] = c.n
    for c in store.ledger_counts(include_resolved=True):
        pair(c.route, c.target)["resolved"] += c.n
    rows = [pairs[k] for k in sorted(pairs)]
    for row in rows:
        row["resolved"] -= row["open"]
        if row["open"]:
            row["suspect_keys"] = store.suspect_keys(row["route"], row["target"])
    return {"open": sum(r["open"] for r in rows), "targets": rows}


def _pct(rate: float) -> str:
    value = rate * 100
    if value == 0:
        return "0%"
    if value < 0.1:
        return "<0.1%"
    return f"{value:.1f}%"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    if ms < 10:
        return f"{ms:.2f}ms"
    if ms < 1000:
        return f"{ms:.0f}ms"
    return f"{seconds:.2f}s"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _render_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no comparisons recorded yet\n"
    out: list[str] = []
    summary_rows = []
    for r in rows:
        lat = r["latency"]
        summary_rows.append(
            [
                r["route"],
                r["target"],
                str(r["compared"]),
                _pct(r["diff_rate"]),
                _pct(r["noise_rate"]),
                f"{_ms(lat['primary_p50'])} / {_ms(lat['shadow_p50'])}",
                f"{_ms(lat['primary_p99'])} / {_ms(lat['shadow_p99'])}",
            ]
        )
    out += _table(
        [
            "route",
            "target",
            "compared",
            "differing",
            "noise",
            "p50 primary/shadow",
            "p99 primary/shadow",
        ],
        summary_rows,
        right={2, 3, 4},
    )
    for r in rows:
        reported = [f for f in r["fields"] if f["reported"]]
        hidden = sum(1 for f in r["fields"] if not f["reported"] and f["raw"] > 0)
        out.append("")
        out.append(f"{r['route']} -> {r['target']}: {len(reported)} field(s) really differ")
        if reported:
            field_rows = [
                [f["field"], _pct(f["raw_rate"]), _pct(f["noise_rate"]), str(f["raw"])]
                for f in reported[:TOP_FIELDS]
            ]
            out += [
                "  " + s
                for s in _table(
                    ["field", "differs", "noise", "requests"], field_rows, right={1, 2, 3}
                )
            ]
            if len(reported) > TOP_FIELDS:
                out.append(f"  ... and {len(reported) - TOP_FIELDS} more (--format json)")
        if hidden:
            out.append(f"  ({hidden} more field(s) differ within their noise, not reported)")
    return "\n".join(out) + "\n"


def _render_ledger(ledger: dict[str, Any]) -> str:
    targets = ledger["targets"]
    if not targets:
        return "divergence ledger: no divergences\n"
    out = [f"divergence ledger: {ledger['open']} open entr{'y' if ledger['open'] == 1 else 'ies'}"]
    for t in targets:
        out.append("")
        head = f"{t['route']} -> {t['target']}: "
        if not t["open"]:
            out.append(head + f"no divergences open ({t['resolved']} resolved)")
            continue
        keys = t["suspect_keys"]
        out.append(
            head + f"{t['open']} open entr{'y' if t['open'] == 1 else 'ies'}, "
            f"{len(keys)} suspect key(s), {t['resolved']} resolved"
        )
        reason_rows = [[reason, str(n)] for reason, n in sorted(t["reasons"].items())]
        out += ["  " + s for s in _table(["reason", "entries"], reason_rows, right={1})]
        out.append("  suspect keys:")
        out += [f"    {key}" for key in keys[:TOP_KEYS]]
        if len(keys) > TOP_KEYS:
            out.append(f"    ... and {len(keys) - TOP_KEYS} more (--format json)")
    return "\n".join(out) + "\n"


def render_report(
    store: ReportRows,
    fmt: Literal["text", "json"] | str = "text",
    thresholds: CompareThresholds | None = None,
) -> str:
    """The report of everything in `store`, as `text` (tables) or `json`."""
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown report format {fmt!r}: use text or json")
    rows = report_data(store, thresholds)
    ledger = ledger_data(store)
    if fmt == "json":
        doc = {"comparisons": rows, "ledger": ledger}
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
    return _render_text(rows) + "\n" + _render_ledger(ledger)
