"""Gates as pure functions over measured values: no store, no clock, no I/O.

Every gate answers one `GateResult`: `pass`, `wait` (not there yet: too little time, too few
comparisons or requests, verify not run yet) or `fail` (the evidence says no: a diff rate over
its bound, a field that must never differ did, the new backend's errors or p99 out of bounds).
The plan advances when every gate passes; a flip step rolls back when one fails; a shadow stage
stops (blocked) on a failure until a person acts, since shadowing harms nothing.

`Measured` is what `figures` read (from the store and the instance's metrics) for the window
since the stage, or the flip step, began.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from shadowlane.config import StageGates

Verdict = Literal["pass", "wait", "fail"]


@dataclass(frozen=True, slots=True)
class GateResult:
    gate: str
    verdict: Verdict
    #: the measured value (None when not measurable yet)
    value: float | int | bool | None
    #: the bound it is held to
    threshold: float | int | bool | None
    #: what it concerns (a route, a field, a backend) and a sentence for a person
    route: str = ""
    field: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict == "pass"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "gate": self.gate,
            "verdict": self.verdict,
            "ok": self.ok,
            "value": self.value,
            "threshold": self.threshold,
            "detail": self.detail,
        }
        if self.route:
            out["route"] = self.route
        if self.field:
            out["field"] = self.field
        return out


@dataclass(frozen=True, slots=True)
class RouteFigures:
    """Comparisons of one route's shadow to the new backend, since the stage began."""

    compared: int = 0
    differing: int = 0
    #: field path -> comparisons in which it differed
    fields: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BackendFigures:
    """A backend's answers as primary in the window: count, errors, p99 (seconds)."""

    requests: int = 0
    errors: int = 0
    p99: float | None = None


@dataclass(frozen=True, slots=True)
class Measured:
    #: seconds in the stage, and in the current flip step
    in_stage: float = 0.0
    in_step: float = 0.0
    routes: dict[str, RouteFigures] = field(default_factory=dict)
    #: open divergence ledger entries for the new backend
    ledger_open: int = 0
    #: verify's verdict (None: not run yet, or it could not run: see verify_detail)
    verify_equal: bool | None = None
    verify_detail: str = ""
    old: BackendFigures = field(default_factory=BackendFigures)
    new: BackendFigures = field(default_factory=BackendFigures)


def _pct(n: int, total: int) -> float:
    return 100.0 * n / total if total else 0.0


def time_gate(name: str, spent: float, bound: float) -> GateResult:
    verdict: Verdict = "pass" if spent >= bound else "wait"
    return GateResult(name, verdict, round(spent, 3), bound, detail=f"{spent:.1f}s of {bound:g}s")


def compared_gates(gates: StageGates, routes: dict[str, RouteFigures]) -> list[GateResult]:
    """min_compared, max_diff_rate (per route) and never_differ (per route and field)."""
    out: list[GateResult] = []
    for route, figs in sorted(routes.items()):
        enough = figs.compared >= gates.min_compared
        if gates.min_compared:
            out.append(
                GateResult(
                    "min_compared",
                    "pass" if enough else "wait",
                    figs.compared,
                    gates.min_compared,
                    route=route,
                    detail=f"{figs.compared} of {gates.min_compared} compared on {route}",
                )
            )
        if gates.max_diff_rate is not None:
            rate = _pct(figs.differing, figs.compared)
            verdict: Verdict
            if rate > gates.max_diff_rate:
                # judged once the sample is big enough: one early difference is not a rate
                verdict = "fail" if enough and figs.compared else "wait"
            else:
                verdict = "pass" if figs.compared or not gates.min_compared else "wait"
            worst = max(figs.fields.items(), key=lambda kv: (kv[1], kv[0]), default=("", 0))
            out.append(
                GateResult(
                    "max_diff_rate",
                    verdict,
                    round(rate, 4),
                    gates.max_diff_rate,
                    route=route,
                    field=worst[0] if rate > gates.max_diff_rate else "",
                    detail=f"{figs.differing} of {figs.compared} differ on {route} "
                    f"({rate:.2f}% > {gates.max_diff_rate:g}%"
                    + (f"; most often {worst[0]}: {worst[1]})" if worst[1] else ")")
                    if rate > gates.max_diff_rate
                    else f"{figs.differing} of {figs.compared} differ on {route} ({rate:.2f}%)",
                )
            )
        for path in gates.never_differ:
            n = figs.fields.get(path, 0)
            out.append(
                GateResult(
                    "never_differ",
                    "fail" if n else "pass",
                    n,
                    0,
                    route=route,
                    field=path,
                    detail=f"{path} differed in {n} of {figs.compared} on {route}",
                )
            )
    if not routes and (gates.min_compared or gates.max_diff_rate is not None):
        out.append(
            GateResult("min_compared", "wait", 0, gates.min_compared, detail="no route compared")
        )
    return out


def flip_gates(gates: StageGates, old: BackendFigures, new: BackendFigures) -> list[GateResult]:
    """max_error_rate and max_p99_ratio of the new backend, judged once it answered
    `min_requests` in the step."""
    out: list[GateResult] = []
    judged = new.requests >= gates.min_requests
    if gates.max_error_rate is not None:
        rate = _pct(new.errors, new.requests)
        verdict: Verdict = (
            "wait" if not judged else "fail" if rate > gates.max_error_rate else "pass"
        )
        out.append(
            GateResult(
                "max_error_rate",
                verdict,
                round(rate, 4),
                gates.max_error_rate,
                detail=f"new backend: {new.errors} errors in {new.requests} requests "
                f"({rate:.2f}%, bound {gates.max_error_rate:g}%)",
            )
        )
    if gates.max_p99_ratio is not None:
        if not judged or new.p99 is None:
            out.append(
                GateResult(
                    "max_p99_ratio",
                    "wait",
                    None,
                    gates.max_p99_ratio,
                    detail=f"new backend: {new.requests} of {gates.min_requests} requests",
                )
            )
        elif old.p99 is None or old.p99 <= 0 or old.requests == 0:
            # all traffic on the new backend: nothing to hold it against in this window
            out.append(
                GateResult(
                    "max_p99_ratio",
                    "pass",
                    None,
                    gates.max_p99_ratio,
                    detail="old backend answered nothing in this step: no ratio",
                )
            )
        else:
            ratio = new.p99 / old.p99
            out.append(
                GateResult(
                    "max_p99_ratio",
                    "fail" if ratio > gates.max_p99_ratio else "pass",
                    round(ratio, 3),
                    gates.max_p99_ratio,
                    detail=f"p99 new {new.p99 * 1000:.1f}ms / old {old.p99 * 1000:.1f}ms",
                )
            )
    return out


def evaluate(gates: StageGates, is_flip: bool, m: Measured) -> list[GateResult]:
    """Every configured gate of a stage, in a fixed order (time, comparisons, ledger, verify,
    then the flip's)."""
    out: list[GateResult] = []
    if gates.min_time:
        out.append(time_gate("min_time", m.in_stage, gates.min_time))
    out += compared_gates(gates, m.routes)
    if gates.ledger_empty:
        out.append(
            GateResult(
                "ledger_empty",
                "pass" if m.ledger_open == 0 else "wait",
                m.ledger_open,
                0,
                detail=f"{m.ledger_open} open divergence ledger entries",
            )
        )
    if gates.verify_equal:
        verdict: Verdict = (
            "wait" if m.verify_equal is None else "pass" if m.verify_equal else "fail"
        )
        out.append(
            GateResult("verify_equal", verdict, m.verify_equal, True, detail=m.verify_detail)
        )
    if is_flip:
        if gates.step_time:
            out.append(time_gate("step_time", m.in_step, gates.step_time))
        out += flip_gates(gates, m.old, m.new)
    return out


def blocking(results: list[GateResult]) -> list[GateResult]:
    """The gates that hold the plan where it is."""
    return [r for r in results if not r.ok]


def failed(results: list[GateResult]) -> list[GateResult]:
    return [r for r in results if r.verdict == "fail"]


def rollback_worthy(results: list[GateResult]) -> list[GateResult]:
    """Failures that move a flip's weight back: the new backend serving badly. (A diff rate
    over its bound during a flip blocks; it does not hurt clients the way errors do.)"""
    return [r for r in failed(results) if r.gate in ("max_error_rate", "max_p99_ratio")]
