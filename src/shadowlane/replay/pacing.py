"""When each recorded request is sent: the recorded spacing scaled, a fixed rate, or at once.

- `--speed X` (default `1x`): the recorded spacing divided by X. Each request is due at
  `start + (its recorded offset) / X`, computed from the first request, not from the previous
  send, so a late send (the concurrency was full) does not push every later one back: the
  replay catches up, and the summary says how far behind it fell (`max_lag_s`).
- `--max-wait D`: a recorded gap longer than D counts as D (GoReplay's
  `--input-file-max-wait`), so a night of silence in a recording does not stall the replay.
- `--rate N`: request n is due at `start + n / N`, whatever the recording's spacing.
- `--speed max` (or `0`): every request is due at once; `--concurrency` is the only limit.

With `--loop`, each pass starts where the previous one's last request was due (the gap
between passes is zero), so a looped recording is one continuous timeline.
"""

from __future__ import annotations

import re
from datetime import datetime

from shadowlane.config import parse_duration

#: `--speed max`: as fast as the concurrency allows
MAX_SPEED = 0.0


class Pacer:
    """Due times (seconds after the start) of successive requests."""

    __slots__ = ("_n", "_offset", "_prev", "max_wait_ns", "rate", "speed")

    def __init__(self, speed: float = 1.0, rate: float | None = None, max_wait: float = 0.0):
        if rate is not None and rate <= 0:
            raise ValueError("rate must be above 0")
        if speed < 0:
            raise ValueError("speed must not be negative")
        self.speed = speed
        self.rate = rate
        self.max_wait_ns = int(max_wait * 1e9)
        self._n = 0
        #: recorded nanoseconds of timeline so far (gaps clamped at max_wait)
        self._offset = 0
        self._prev: int | None = None

    def new_pass(self) -> None:
        """A `--loop` pass begins: its first request follows the last one without a gap."""
        self._prev = None

    def due(self, ts_ns: int) -> float:
        """Seconds after the start at which the request recorded at `ts_ns` is due."""
        n = self._n
        self._n += 1
        if self.rate is not None:
            return n / self.rate
        if self.speed == MAX_SPEED:
            return 0.0
        prev = self._prev
        if prev is not None:
            gap = max(0, ts_ns - prev)
            if self.max_wait_ns and gap > self.max_wait_ns:
                gap = self.max_wait_ns
            self._offset += gap
        self._prev = ts_ns
        return self._offset / 1e9 / self.speed


def parse_speed(text: str) -> float:
    """`2x`, `2`, `0.5x`, `200%` (GoReplay's form) -> 2.0, 2.0, 0.5, 2.0; `max` or `0` -> 0."""
    t = text.strip().lower()
    if t in ("max", "0", "0x", "0%"):
        return MAX_SPEED
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t.removesuffix("x"))
    except ValueError:
        raise ValueError(f"not a speed: {text!r} (use e.g. 1x, 2x, 0.5x, 200% or max)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"not a speed: {text!r} (must be above 0, or max)")
    return value


def parse_rate(text: str) -> float:
    """Requests per second: `50`, `12.5`, `50/s`."""
    t = text.strip().lower().removesuffix("/s")
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (requests per second, e.g. 50)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"not a rate: {text!r} (must be above 0)")
    return value


_NUMBER = re.compile(r"\d+(\.\d+)?")


def parse_time(text: str) -> tuple[str, int]:
    """A window end: ("at", epoch ns) or ("offset", ns after the recording's first record).

    - RFC 3339: `2025-05-01T12:00:00Z`, `2025-05-01T14:00:00.250+02:00` (an offset or `Z` is
      required: a time without one means different instants on different machines);
    - epoch seconds: `1746100800`, `1746100800.25`; a number of 17 digits or more is taken as
      nanoseconds, as the payload headers write it;
    - an offset from the recording's first record: `+30s`, `+1m30s`, `+250ms`, `+0`.
    """
    t = text.strip()
    if t.startswith("+"):
        try:
            return "offset", round(parse_duration(t[1:]) * 1e9)
        except ValueError:
            raise ValueError(f"not an offset: {text!r} (use e.g. +30s, +1m30s)") from None
    if _NUMBER.fullmatch(t):
        if "." not in t and len(t) >= 17:
            return "at", int(t)
        return "at", round(float(t) * 1e9)
    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (RFC 3339 like 2025-05-01T12:00:00Z, epoch seconds, or an "
            "offset like +30s)"
        ) from None
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset: add Z or +HH:MM")
    whole = int(when.timestamp())
    return "at", whole * 1_000_000_000 + when.microsecond * 1000


def parse_threshold(text: str) -> tuple[float, bool]:
    """`--max-failures`: `N` (requests) or `P%` (of the requests sent) -> (value, is_percent)."""
    t = text.strip()
    percent = t.endswith("%")
    number = t[:-1].strip() if percent else t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a count or percentage: {text!r} (use e.g. 0, 10 or 0.5%)") from None
    if value < 0 or value == float("inf") or (not percent and value != int(value)):
        raise ValueError(f"not a count or percentage: {text!r} (use e.g. 0, 10 or 0.5%)")
    return value, percent
