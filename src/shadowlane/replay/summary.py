"""What a replay did: the counts, the failures judged against `--max-failures`, the output.

A request *fails* when the target did not answer it (connection error, timeout), when its
answer differs from the primary's beyond noise (a comparison result `diff`), or when the write
steps recorded a divergence for it (it may have left the target unlike the primary). Each
request counts once, whatever the number of reasons. The exit status is 1 when the failures
exceed `--max-failures` (a count, or a percentage of the requests sent; default 0: any failure
fails the replay), else 0; 2 is for a replay that could not run at all.

Answers with an error status (a 404 or a 503 from the target) are not failures by themselves:
a recording has its 404s too. Compare the answers to judge them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from shadowlane.replay.source import Counts

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANNOT_RUN = 2

#: failures kept as examples in the summary
EXAMPLES = 10


@dataclass
class Side:
    """The answers of one target (`to`, `primary`, `secondary`)."""

    label: str
    sent: int = 0
    answered: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    timeouts: int = 0

    def add(self, status: int, failure: str) -> None:
        self.sent += 1
        if failure == "timeout":
            self.timeouts += 1
        elif failure:
            self.errors += 1
        else:
            key = f"{status // 100}xx"
            self.answered[key] = self.answered.get(key, 0) + 1

    def doc(self) -> dict[str, Any]:
        return {
            "target": self.label,
            "sent": self.sent,
            "answered": dict(sorted(self.answered.items())),
            "errors": self.errors,
            "timeouts": self.timeouts,
        }


@dataclass
class Tally:
    """Everything counted during one replay (on the event loop's thread)."""

    to: Side
    primary: Side | None = None
    secondary: Side | None = None
    source: Counts = field(default_factory=Counts)
    #: requests taken from the recording and scheduled
    scheduled: int = 0
    #: not replayed, by reason (not routed to the route/shadow, body too big, ...)
    skipped: dict[str, int] = field(default_factory=dict)
    compared: int = 0
    matched: int = 0
    noise: int = 0
    differing: int = 0
    #: compared requests that had no recorded answer to be compared with
    unanswered: int = 0
    divergences: dict[str, int] = field(default_factory=dict)
    #: writes whose end could not be checked (the primary's answer is unknown)
    unchecked: int = 0
    failures: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    passes: int = 0
    started: float = 0.0
    first_send: float | None = None
    last_send: float | None = None
    ended: float = 0.0
    max_lag: float = 0.0
    #: the total the progress bar counts towards, once known
    total: int | None = None
    stopped: str = ""

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def failed(self, item_id: str, method: str, uri: str, why: str) -> None:
        self.failures += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append({"id": item_id, "method": method, "uri": uri, "why": why})

    @property
    def done(self) -> int:
        return self.to.sent

    @property
    def errors(self) -> int:
        return self.to.errors

    def all_skipped(self) -> dict[str, int]:
        c = self.source
        out = {"window": c.window, "invalid": c.invalid, "upgrade": c.upgrade}
        out["filtered"] = c.filtered
        out.update(self.skipped)
        return {k: v for k, v in sorted(out.items()) if v}


@dataclass(frozen=True)
class Threshold:
    value: float = 0.0
    percent: bool = False

    def allowed(self, sent: int) -> float:
        return self.value * sent / 100 if self.percent else self.value

    def __str__(self) -> str:
        if self.percent:
            return f"{self.value:g}%"
        return f"{int(self.value)}"


def exit_status(t: Tally, threshold: Threshold) -> int:
    return EXIT_FAILED if t.failures > threshold.allowed(t.to.sent) else EXIT_OK


def summary_doc(t: Tally, threshold: Threshold, store: str | None) -> dict[str, Any]:
    """The JSON summary (`--format json`); the text form shows the same values."""
    duration = max(0.0, t.ended - t.started)
    span = (
        t.last_send - t.first_send if t.first_send is not None and t.last_send is not None else 0.0
    )
    first, last = t.source.first_ns, t.source.last_ns
    recorded = (last - first) / 1e9 if first is not None and last is not None else 0.0
    status = exit_status(t, threshold)
    doc: dict[str, Any] = {
        "ok": status == EXIT_OK,
        "exit": status,
        "sent": t.to.sent,
        "answered": dict(sorted(t.to.answered.items())),
        "errors": t.to.errors,
        "timeouts": t.to.timeouts,
        "target": t.to.label,
        "skipped": t.all_skipped(),
        "compared": t.compared,
        "matched": t.matched,
        "noise": t.noise,
        "differing": t.differing,
        "unanswered": t.unanswered,
        "divergences": dict(sorted(t.divergences.items())),
        "unchecked": t.unchecked,
        "failures": t.failures,
        "max_failures": str(threshold),
        "duration_s": round(duration, 6),
        "send_span_s": round(span, 6),
        "recorded_span_s": round(recorded, 6),
        "rate": round(t.to.sent / duration, 3) if duration > 0 else 0.0,
        "max_lag_s": round(t.max_lag, 6),
        "passes": t.passes,
        "store": store,
        "examples": t.examples,
    }
    if t.primary is not None:
        doc["primary"] = t.primary.doc()
    if t.secondary is not None:
        doc["secondary"] = t.secondary.doc()
    if t.stopped:
        doc["stopped"] = t.stopped
    return doc


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def render_text(doc: dict[str, Any]) -> str:
    lines = [
        f"replayed {doc['sent']} request(s) to {doc['target']} in {doc['duration_s']:.2f}s "
        f"({doc['rate']:.1f}/s; recorded span {doc['recorded_span_s']:.2f}s, "
        f"sent over {doc['send_span_s']:.2f}s, at most {doc['max_lag_s']:.3f}s behind)",
        f"  answered   {_counts(doc['answered'])}",
        f"  errors     {doc['errors']}, timeouts {doc['timeouts']}",
    ]
    for role in ("primary", "secondary"):
        side = doc.get(role)
        if side is not None:
            lines.append(
                f"  {role:<10} {side['target']}: answered {_counts(side['answered'])}; "
                f"errors {side['errors']}, timeouts {side['timeouts']}"
            )
    if doc["skipped"]:
        lines.append(f"  skipped    {_counts(doc['skipped'])}")
    if doc["compared"] or doc["unanswered"]:
        lines.append(
            f"  compared   {doc['compared']}: matched {doc['matched']}, noise {doc['noise']}, "
            f"differing {doc['differing']}"
            + (f" ({doc['unanswered']} without a recorded answer)" if doc["unanswered"] else "")
        )
    if doc["divergences"] or doc["unchecked"]:
        lines.append(
            f"  divergences {_counts(doc['divergences'])}"
            + (f" ({doc['unchecked']} write(s) unchecked)" if doc["unchecked"] else "")
        )
    if doc["store"]:
        lines.append(f"  store      {doc['store']} (see `shadowlane report --store ...`)")
    if doc.get("stopped"):
        lines.append(f"  stopped    {doc['stopped']}")
    verdict = "ok" if doc["ok"] else "FAILED"
    lines.append(f"{verdict}: {doc['failures']} failure(s), at most {doc['max_failures']} allowed")
    for ex in doc["examples"]:
        lines.append(f"  {ex['method']} {ex['uri']} (record {ex['id']}): {ex['why']}")
    return "\n".join(lines)


def render_json(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()


def eta(t: Tally, remaining_s: float | None) -> str:
    if remaining_s is None or not math.isfinite(remaining_s) or remaining_s < 0:
        return "--:--"
    m, s = divmod(int(remaining_s + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
