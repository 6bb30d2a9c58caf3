"""A verify's result for a person (a table and a few examples) or a script (JSON), and the
progress bar.

The progress bar goes to stderr and only when stderr is a terminal: a verify of a large
cluster runs for minutes, and a person wants to see it move, but a script or a CI log wants
stdout to be the result alone and stderr to be only what went wrong.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

import orjson

from shadowlane.verify.model import Example, VerifyResult

__all__ = ["TerminalProgress", "render", "render_json", "render_text"]

#: differing paths shown per example in the text form (JSON has all)
TEXT_FIELDS = 5
#: a value longer than this is cut in the text form
TEXT_VALUE = 40


def render_json(result: VerifyResult) -> str:
    return orjson.dumps(result.as_json(), option=orjson.OPT_INDENT_2).decode() + "\n"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _value(value: Any) -> str:
    text = "absent" if value is None else orjson.dumps(value).decode()
    return text if len(text) <= TEXT_VALUE else text[: TEXT_VALUE - 3] + "..."


def _example(e: Example) -> str:
    head = f"  {e.index}/{e.id}: "
    if e.kind == "only_in_primary":
        text = head + "only in primary"
    elif e.kind == "only_in_shadow":
        text = head + "only in shadow"
    else:
        shown = []
        for path in e.fields[:TEXT_FIELDS]:
            pair = e.values.get(path)
            shown.append(f"{path} ({_value(pair[0])} -> {_value(pair[1])})" if pair else path)
        more = len(e.fields) - TEXT_FIELDS
        text = head + "differs at " + ", ".join(shown) + (f", and {more} more" if more > 0 else "")
    if e.repaired is not None:
        text += " [repaired]" if e.repaired else " [NOT repaired]"
    return text


def render_text(result: VerifyResult) -> str:
    out = [f"primary {result.primary}  shadow {result.shadow}"]
    if result.suspects is not None:
        s = result.suspects
        out.append(
            f"suspects: {s.labels} ledger key(s)"
            + (f", {len(s.ignored)} not Elasticsearch keys" if s.ignored else "")
            + (f", {s.unselected} outside --index" if s.unselected else "")
        )
    if not result.indices:
        out.append("no index to compare")
    else:
        rows = []
        for i in result.indices:
            rows.append(
                [
                    i.name,
                    i.on,
                    str(i.compared),
                    str(i.equal_docs),
                    str(i.only_in_primary),
                    str(i.only_in_shadow),
                    str(i.differing),
                ]
            )
        if len(result.indices) > 1:
            rows.append(
                [
                    "(all)",
                    "",
                    *(
                        str(result.total(a))
                        for a in (
                            "compared",
                            "equal_docs",
                            "only_in_primary",
                            "only_in_shadow",
                            "differing",
                        )
                    ),
                ]
            )
        out += _table(
            ["index", "on", "compared", "equal", "only-primary", "only-shadow", "differing"], rows
        )
    if result.examples:
        out.append("")
        out.append("examples (primary -> shadow):")
        out += [_example(e) for e in result.examples]
    if result.repair is not None:
        r = result.repair
        out.append("")
        line = f"repaired: {r.indexed} written, {r.deleted} deleted on the shadow"
        if r.failed or r.skipped or r.still_differing:
            line += (
                f"; {r.failed} refused, {r.skipped} not attempted, "
                f"{r.still_differing} still differing after the repair"
            )
        out.append(line)
    if result.suspects is not None and result.repair is not None:
        s = result.suspects
        out.append(
            f"ledger: {s.resolved_labels} key(s) resolved, {s.resolved_entries} entr(y/ies) closed"
        )
    differences = sum(i.differences for i in result.indices)
    compared = result.total("compared")
    if result.equal and not differences:
        verdict = f"EQUAL: {compared} document(s) compared"
    elif result.equal:
        verdict = (
            f"EQUAL after repair: {differences} of {compared} document(s) differed, all repaired"
        )
    else:
        verdict = f"DIFFERENT: {differences} of {compared} document(s)"
        if result.repair is not None:
            verdict += f" differed; {result.repair.remaining} still after the repair"
    out.append("")
    out.append(f"{verdict} ({result.seconds:.1f}s)")
    return "\n".join(out) + "\n"


def render(result: VerifyResult, fmt: str) -> str:
    return render_json(result) if fmt == "json" else render_text(result)


class TerminalProgress:
    """`verify: 1200/2400 docs (50%) 3400 docs/s` on one line of `stream`, redrawn at most
    ten times a second; nothing at all when `stream` is not a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.total = 0
        self.done = 0
        self._started = time.monotonic()
        self._drawn = 0.0

    def start(self, total: int) -> None:
        self.total = total
        self._started = time.monotonic()
        self._draw(force=True)

    def advance(self, docs: int) -> None:
        self.done += docs
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        rate = self.done / max(now - self._started, 1e-6)
        done = min(self.done, self.total) if self.total else self.done
        pct = f" ({100 * done // self.total}%)" if self.total else ""
        self.stream.write(f"\rverify: {done}/{self.total} docs{pct} {rate:,.0f} docs/s\x1b[K")
        self.stream.flush()

    def say(self, line: str) -> None:
        """Print a line (a warning) without leaving half a progress bar in front of it."""
        if self.enabled:
            self.stream.write("\r\x1b[K")
        self.stream.write(line + "\n")
        self.stream.flush()
        if self.enabled and self.total:
            self._draw(force=True)

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
