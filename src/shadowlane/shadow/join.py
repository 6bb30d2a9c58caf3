"""Joining the answers of one compared request: primary, candidate (the shadow), secondary.

The primary's answer is captured as it streams to the client (up to a cap), never delaying it.
Each compared shadow of the request gets a `CompareSlot`; the slot fills as the answers arrive,
in any order, and hands one `CompareJob` to the comparator (non-blocking) when complete. Every
part has a deadline (the primary's timeout, the copies' timeouts), so a slot always resolves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shadowlane.compare.model import Captured, CompareJob
from shadowlane.shadow.lane import ShadowCopy, ShadowResult
from shadowlane.shadow.outcomes import ABORTED, CIRCUIT_OPEN, COMPARISON_DROPPED, COPY_DROPPED, OK
from shadowlane.wire.messages import Headers

if TYPE_CHECKING:
    from shadowlane.metrics import Metrics

#: request bodies kept with example pairs are cut to this size
EXAMPLE_REQUEST_BODY = 16 * 1024

Submit = Callable[[CompareJob], bool]
#: whether the comparator would take a job begun now (`Comparator.has_room`)
Room = Callable[[], bool]


class PrimaryCapture:
    """The primary's answer, copied as it passes through (up to `limit` body bytes)."""

    __slots__ = ("_chunks", "_size", "headers", "limit", "result", "slots", "status", "trailers")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.headers: Headers = []
        #: the answer's trailers (set by the proxy when an HTTP/2 backend sends some)
        self.trailers: Headers = []
        self._chunks: list[bytes] = []
        self._size = 0
        self.result: Captured | None = None
        self.slots: list[CompareSlot] = []

    def head(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers

    def body(self, data: bytes) -> None:
        room = self.limit - self._size
        if room > 0:
            self._chunks.append(data if len(data) <= room else data[:room])
        self._size += len(data)

    def finish(self, seconds: float, failure: str = "", status: int | None = None) -> None:
        if self.result is not None:
            return
        self.result = Captured(
            status=self.status if status is None else status,
            headers=self.headers,
            body=b"".join(self._chunks),
            truncated=self._size > self.limit,
            seconds=seconds,
            failure=failure,
            trailers=self.trailers,
        )
        self._chunks = []
        slots, self.slots = self.slots, []
        for slot in slots:
            slot.set_primary(self.result)

    def abandon(self) -> None:
        """The client left: nothing to compare against."""
        slots, self.slots = self.slots, []
        for slot in slots:
            slot.abandon()

    def attach(self, slot: CompareSlot) -> None:
        if self.result is not None:
            slot.set_primary(self.result)
        else:
            self.slots.append(slot)


def captured(result: ShadowResult) -> Captured:
    return Captured(
        status=result.status,
        headers=result.headers,
        body=result.body,
        truncated=result.body_truncated,
        seconds=result.seconds,
        failure="" if result.outcome == OK else result.outcome,
        trailers=result.trailers,
    )


class CompareSlot:
    """One compared shadow of one request, waiting for its two or three answers."""

    __slots__ = (
        "_submit",
        "candidate",
        "dead",
        "job",
        "metrics",
        "need_secondary",
        "primary",
        "secondary",
    )

    def __init__(self, job: CompareJob, need_secondary: bool, submit: Submit, metrics: Metrics):
        self.job = job
        self.need_secondary = need_secondary
        self._submit = submit
        self.metrics = metrics
        self.primary: Captured | None = None
        self.candidate: Captured | None = None
        self.secondary: Captured | None = None
        self.dead = False

    def set_primary(self, c: Captured) -> None:
        self.primary = c
        self._maybe_submit()

    def on_candidate(self, _copy: ShadowCopy, result: ShadowResult) -> None:
        end = result.outcome
        if end in (CIRCUIT_OPEN, COPY_DROPPED, ABORTED):
            # not sent, or (aborted) sent only in part: its answer, if any, is not to the
            # request the primary answered, so there is nothing to compare
            self._drop()
            return
        self.candidate = captured(result)
        self._maybe_submit()

    def on_secondary(self, _copy: ShadowCopy, result: ShadowResult) -> None:
        if result.outcome != OK:
            # without the secondary's answer the noise of this request is unknown: comparing
            # would report noise as differences, so the comparison is dropped (counted)
            self._drop()
            return
        self.secondary = captured(result)
        self._maybe_submit()

    def abandon(self) -> None:
        self.dead = True

    def copy_dropped(self) -> None:
        """A copy of this slot was not sent (lane full): no comparison for this request."""
        self._drop()

    def _drop(self) -> None:
        if not self.dead:
            self.dead = True
            self.metrics.comparison(self.job.route, self.job.target, COMPARISON_DROPPED)

    def _maybe_submit(self) -> None:
        if self.dead or self.primary is None or self.candidate is None:
            return
        if self.need_secondary and self.secondary is None:
            return
        self.dead = True
        job = self.job
        job.primary = self.primary
        job.candidate = self.candidate
        job.secondary = self.secondary
        job.ts = time.time()
        self._submit(job)  # non-blocking; a full queue is counted as dropped by the comparator


EMPTY = Captured(status=0, headers=[], body=b"", truncated=False, seconds=0.0, failure="pending")
