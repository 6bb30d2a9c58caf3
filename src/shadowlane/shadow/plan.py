"""What the dispatcher precomputes per route: one `LanePlan` per shadow, in a `RouteShadows`.

Built once per (re)load, read per request by the dispatcher and the ticket, so everything a
request would otherwise derive from the config (the sampler, the extra match, the write steps,
whether copies wait for the answer) is decided here. A module of its own so that the ticket
and the dispatcher both use it without importing each other.
"""

from __future__ import annotations

from typing import Final

from shadowlane.config import ShadowConfig
from shadowlane.record.recorder import Recorder
from shadowlane.routing import compile_match
from shadowlane.shadow.lane import ShadowLane
from shadowlane.shadow.mutation import CopyBuilder
from shadowlane.shadow.sampling import KeyFn, Sampler, key_function
from shadowlane.shadow.writes import ANSWER_LIMIT, WritePlan

#: a body size no request reaches (1 EiB, still a short int when compiled): "nothing
#: streams" without a second test
NEVER: Final = 1 << 60


def _key(spec: tuple[str, str] | None) -> KeyFn | None:
    return key_function(*spec) if spec is not None else None


class LanePlan:
    """One shadow of a route: how to choose, build and send its copies."""

    __slots__ = (
        "after_response",
        "builder",
        "capture_limit",
        "capture_uncompared",
        "cfg",
        "compare_settings",
        "compares",
        "copy_capture_uncompared",
        "lane",
        "match",
        "recorder",
        "sampler",
        "secondary",
        "streams",
        "writes",
    )

    def __init__(
        self,
        cfg: ShadowConfig,
        lane: ShadowLane,
        builder: CopyBuilder,
        secondary: ShadowLane | None = None,
        compare_settings: object = None,
        writes: WritePlan | None = None,
        compares: bool = False,
        recorder: Recorder | None = None,
    ) -> None:
        self.cfg = cfg
        self.lane = lane
        self.builder = builder
        #: with noise cancellation: the lane to the secondary (same version as the primary)
        self.secondary = secondary
        self.compares = compares
        #: ordered or id-rewriting: the write steps around each copy (shadow/writes.py)
        self.writes = writes
        #: how much of the primary's answer this shadow needs captured
        self.capture_limit = lane.capture_limit
        #: ... when the request's comparison is not admitted (the comparator is full): only
        #: what the write steps check
        self.capture_uncompared = 0
        if writes is not None and writes.needs_answer:
            self.capture_limit = max(self.capture_limit, ANSWER_LIMIT)
            self.capture_uncompared = ANSWER_LIMIT
        #: how much of the shadow's own answer a copy keeps then (writes, recorded answers);
        #: set by the dispatcher once the lane's recording is known
        self.copy_capture_uncompared = self.capture_uncompared
        #: compiled by compare/ and only handed back to it (so opaque here)
        self.compare_settings = compare_settings
        self.sampler = Sampler(cfg.percent, _key(cfg.sample_key))
        self.match = compile_match(cfg.match) if cfg.match is not None else None
        self.after_response = cfg.waits_for_primary
        #: `record:` of this shadow: the copies sent (and, with answers, the shadow's answers)
        self.recorder = recorder
        #: `stream_body`: a body over max_body is streamed in step with the primary. Only a
        #: copy sent with the request can: one sent after the primary answered (asked for,
        #: ordered, rebuilt from the answer) would need the whole body kept
        self.streams = cfg.stream_body and not self.after_response


class RouteShadows:
    """All shadows of one route."""

    __slots__ = ("lanes", "max_body", "route", "stream_at")

    def __init__(self, route: str, lanes: list[LanePlan]) -> None:
        self.route = route
        self.lanes = lanes
        self.max_body = max(p.cfg.max_body for p in lanes)
        #: a body bigger than this may be streamed to some shadow (NEVER: none streams);
        #: the proxy's one compare per body that decides whether to ask the ticket
        self.stream_at = min((p.cfg.max_body for p in lanes if p.streams), default=NEVER)
