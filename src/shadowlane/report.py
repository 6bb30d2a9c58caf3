"""`shadowlane report`: the comparison summary as a terminal table or as JSON.

The text form answers, per route and shadow target, the questions of a migration review in one
screen: how much was compared, how much really differs (beyond noise), whether the new backend is
slower, and which fields differ, each shown beside its noise so a person can judge the threshold.
The JSON form is the same data as the admin API's summary plus every field of each pair, for
scripts (CI gates such as "no reported field on route X"). Both come from the same `Analysis` as
the API's, so a field reported on the dashboard is reported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import orjson

from shadowlane.compare.analysis import Analysis, ComparisonRows

if TYPE_CHECKING:
    from shadowlane.config import CompareThresholds

__all__ = ["render_report", "report_data"]

#: reported fields listed per route/target in the text form
TOP_FIELDS = 10


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


def render_report(
    store: ComparisonRows,
    fmt: Literal["text", "json"] | str = "text",
    thresholds: CompareThresholds | None = None,
) -> str:
    """The report of everything in `store`, as `text` (tables) or `json`."""
    rows = report_data(store, thresholds)
    if fmt == "json":
        return orjson.dumps({"comparisons": rows}, option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt != "text":
        raise ValueError(f"unknown report format {fmt!r}: use text or json")
    return _render_text(rows)
