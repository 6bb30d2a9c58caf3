"""The overload manager: watermarks on process memory and in-flight requests, as one level.

In the spirit of Envoy's overload manager: resources (RSS, requests in flight) are sampled on
a timer (the server's timeout sweep, four times a second), each compared with two watermarks,
and the worst of them sets the level every request reads:

* NORMAL: everything is served and shadowed.
* SHED: shadow work is shed first (copies are counted `shed` and never built), since it is
  the part of the load that no client waits for.
* REFUSE: new requests are answered 503 with `Retry-After` and never reach a backend;
  requests already in flight finish.

The level is a plain int so that the hot path pays one attribute load and one integer compare
per request. The state is shared by the listener's sweep (which writes it) and the proxy
(which reads it); it outlives reloads, whose new watermarks are written into it in place.
"""

from __future__ import annotations

import os
from typing import Final

__all__ = ["LEVEL_NAMES", "NORMAL", "REFUSE", "SHED", "OverloadState", "read_rss"]

NORMAL: Final = 0
SHED: Final = 1
REFUSE: Final = 2
LEVEL_NAMES: Final = ("normal", "shed", "refuse")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_rss() -> int:
    """This process's resident set size in bytes (0 when the platform does not say).

    /proc/self/statm is one short read: cheap enough four times a second, unlike
    psutil or /proc/self/status parsing."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _level(value: int, shed_at: int, refuse_at: int) -> int:
    """One resource's level; a watermark of 0 is off."""
    if refuse_at and value >= refuse_at:
        return REFUSE
    if shed_at and value >= shed_at:
        return SHED
    return NORMAL


class OverloadState:
    """The watermarks, the last sample, and the level they give."""

    __slots__ = (
        "in_flight",
        "in_flight_refuse",
        "in_flight_shed",
        "level",
        "retry_after",
        "rss",
        "rss_refuse",
        "rss_shed",
        "transitions",
    )

    def __init__(
        self,
        rss_shed: int = 0,
        rss_refuse: int = 0,
        in_flight_shed: int = 0,
        in_flight_refuse: int = 0,
        retry_after: int = 1,
    ) -> None:
        self.configure(rss_shed, rss_refuse, in_flight_shed, in_flight_refuse, retry_after)
        self.level = NORMAL
        self.rss = 0
        self.in_flight = 0
        #: times the level went up (into SHED or REFUSE), for the log and the tests
        self.transitions = 0

    @property
    def watches_rss(self) -> bool:
        return bool(self.rss_shed or self.rss_refuse)

    def configure(
        self,
        rss_shed: int,
        rss_refuse: int,
        in_flight_shed: int,
        in_flight_refuse: int,
        retry_after: int,
    ) -> None:
        """New watermarks (at start and on a reload); the level follows at the next sample."""
        self.rss_shed = rss_shed
        self.rss_refuse = rss_refuse
        self.in_flight_shed = in_flight_shed
        self.in_flight_refuse = in_flight_refuse
        #: seconds, the `Retry-After` of a refused request
        self.retry_after = retry_after

    def evaluate(self, rss: int, in_flight: int) -> int:
        """The transition function: the sample in, the new level out (and stored)."""
        self.rss = rss
        self.in_flight = in_flight
        level = max(
            _level(rss, self.rss_shed, self.rss_refuse),
            _level(in_flight, self.in_flight_shed, self.in_flight_refuse),
        )
        if level > self.level:
            self.transitions += 1
        self.level = level
        return level
