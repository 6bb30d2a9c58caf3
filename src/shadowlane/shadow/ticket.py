"""The ticket: one request's shadowing, handed to the proxy by `ShadowDispatcher.begin`.

The proxy holds the ticket and tells it about the request's moments, passing what each moment
needs; the ticket never reads the proxy's call, and shadow/ imports nothing of the proxy:
  `request_done(body)`                    the body is complete (or there is none): the
                                          `send: with_request` copies go now;
  `response_done(status, body, may_follow)` the primary answered, failed or the client left:
                                          `after_response` (and ordered) copies go now;
  `late_body(body)`                       the body of a request answered early is complete,
                                          or lost for good: the copies that waited for it;
  `stream(size, chunked, so_far)`         the body is bigger than `stream_at` (its
                                          Content-Length, or a chunked body once it passed
                                          it): `stream_body` shadows it outgrew get a
                                          streamed copy now, fed by the proxy (`BodyStream`).
It holds `capture` (the primary's answer, when a compared shadow needs it) for the proxy to
feed, and `outcomes` (target -> what became of the copy) for the access log.

Every lane the request was sampled into gets exactly one outcome here: `sent` or `dropped`
when the copy was handed to its lane (the lane counts what happens next), `skipped_body` or
`skipped_status` when no copy was built. Lanes not sampled were counted `sampled_out` by the
dispatcher and have no ticket entry. Each copy is built once, from the shared body (`Body`), and
handed to its lane, which starts, queues or drops it without waiting.

A concrete class, not a Protocol: compiled, the proxy's calls into it are direct C calls.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from shadowlane.compare.model import CompareJob
from shadowlane.record.recorder import Recorder
from shadowlane.shadow.join import (
    EMPTY,
    EXAMPLE_REQUEST_BODY,
    CompareSlot,
    PrimaryCapture,
    Submit,
    captured,
)
from shadowlane.shadow.lane import (
    STREAM_SLACK,
    BodyStream,
    OnDone,
    ShadowCopy,
    ShadowLane,
    ShadowResult,
    StreamedCopy,
)
from shadowlane.shadow.outcomes import (
    CIRCUIT_OPEN,
    COMPARISON_DROPPED,
    COPY_DROPPED,
    DIV_DROPPED,
    DIV_PRIMARY_INCOMPLETE,
    DIV_PRIMARY_UNUSABLE,
    DIV_SKIPPED_BODY,
    DROPPED,
    SENT,
    SKIPPED_ANSWER,
    SKIPPED_BODY,
    SKIPPED_STATUS,
    DivergenceReason,
    Outcome,
)
from shadowlane.shadow.plan import NEVER, LanePlan
from shadowlane.shadow.writes import Prepared, Unsent, WriteEnd, WritePlan
from shadowlane.wire.messages import Body, Headers, Request, body_of

if TYPE_CHECKING:
    from shadowlane.metrics import Metrics


class ShadowTicket:
    """The lanes one request was sampled into, and what became of each."""

    __slots__ = (
        "_admitted",
        "_base",
        "_compare_submit",
        "_metrics",
        "_request",
        "_requested",
        "_sampled",
        "_status",
        "_waiting_body",
        "capture",
        "outcomes",
        "stream_at",
        "streamed",
    )

    def __init__(
        self,
        request: Request,
        base: Headers,
        sampled: list[LanePlan],
        capture: PrimaryCapture | None,
        metrics: Metrics,
        compare_submit: Submit | None,
        admitted: bool = True,
        stream_at: int = NEVER,
    ) -> None:
        self._request = request
        #: False when the comparator was full as the request began: its compared copies are
        #: sent uncompared (comparison `dropped`), and nothing is captured for them
        self._admitted = admitted
        #: the headers as forwarded to the primary; each copy is built from them
        self._base = base
        self._sampled = sampled
        self._metrics = metrics
        self._compare_submit = compare_submit
        #: the primary's answer as it streams by, when a compared shadow needs it
        self.capture = capture
        #: target -> outcome, for the access log line
        self.outcomes: dict[str, str] = {}
        #: the `with_request` copies have been decided (sent, dropped or skipped)
        self._requested = False
        #: `with_request` copies waiting for the rest of a body the primary answered early
        self._waiting_body: list[LanePlan] = []
        #: the primary's status, once it answered (write copies are built from the answer)
        self._status = 0
        #: a body over this many bytes may stream to a sampled lane (the route's
        #: `RouteShadows.stream_at`, so no per-request work); NEVER once nothing can
        self.stream_at = stream_at
        #: the streamed copies of this request's body, once one was made
        self.streamed: BodyStream | None = None

    # ----- the proxy's moments -----
    def request_done(self, body: Body | None) -> None:
        """The request body is complete, or there is none (`body` is None when it was too big
        to keep): `with_request` copies go now, whatever becomes of the primary."""
        if self._requested:
            return
        self._requested = True
        self.stream_at = NEVER
        for p in self._sampled:
            if not p.after_response:
                self._submit(p, body)

    def response_done(self, status: int, body: Body | None, body_may_follow: bool) -> None:
        """The primary answered with `status`, failed, or the client left (499). `body` is the
        whole request body, or None when it is not (or will not be) complete; `body_may_follow`
        when the primary answered early and the rest is still being read for the copies.

        `with_request` copies not decided yet wait for that rest (see `late_body`), or are
        skipped; `after_response` copies go now, or are skipped for the status or the body."""
        requested = self._requested
        self._requested = True
        self.stream_at = NEVER
        self._status = status
        for p in self._sampled:
            if not p.after_response:
                if not requested:
                    if body is not None:
                        self._submit(p, body)
                    elif body_may_follow:
                        self._waiting_body.append(p)
                    else:
                        self._outcome(p, SKIPPED_BODY)
                continue
            if status == 499:
                # the client left and the primary exchange was abandoned mid-way: whether the
                # primary applied a write is unknown
                self._outcome(p, SKIPPED_STATUS)
                self._unsent_write(p, body, DIV_PRIMARY_INCOMPLETE, "client left")
                continue
            if p.cfg.only_if_primary == "2xx" and not 200 <= status < 300:
                self._outcome(p, SKIPPED_STATUS)
                continue
            if body is None:
                self._outcome(p, SKIPPED_BODY)
                self._unsent_write(p, None, DIV_SKIPPED_BODY, "body not kept")
                continue
            self._submit(p, body)

    def late_body(self, body: Body | None) -> None:
        """The body of a request the primary answered early is complete, or (None) lost for
        good: the `with_request` copies that waited for it go now, or are `skipped_body`."""
        waiting, self._waiting_body = self._waiting_body, []
        for p in waiting:
            if body is not None:
                self._submit(p, body)
            else:
                self._outcome(p, SKIPPED_BODY)

    def stream(self, size: int, chunked: bool, so_far: list[bytes]) -> BodyStream | None:
        """The body is `size` bytes (its Content-Length, or so far for a chunked one), more
        than `stream_at`, and `so_far` is all of it read until now (the proxy still holds
        it): every sampled `stream_body` lane whose `max_body` it outgrew gets a streamed
        copy now (or `dropped`: no slot free at once, circuit open, byte bounds), and is
        decided; the rest wait for the body as usual. Returns the streamed copies for the
        proxy to feed (None when none was made)."""
        keep: list[LanePlan] = []
        for p in self._sampled:
            if p.streams and size > p.cfg.max_body:
                self._stream_copy(p, -1 if chunked else size, so_far)
            else:
                keep.append(p)
        self._sampled = keep
        self.stream_at = min((p.cfg.max_body for p in keep if p.streams), default=NEVER)
        return self.streamed

    def _stream_copy(self, p: LanePlan, length: int, so_far: list[bytes]) -> None:
        """One streamed copy of a `stream_body` lane (`length` -1: chunked), and, with noise
        cancellation, one to its secondary; both are fed the same chunks. A streamed copy is
        not recorded (`record:` of the shadow): its body is never held whole."""
        lane = p.lane
        if lane.breaker.is_open():
            lane.fail_open()
            self._dropped(p)
            return
        # what it may hold unsent past what it is handed: max_body, at least STREAM_SLACK (a
        # connect takes a few loop turns, each may read 256 KiB)
        slack = max(p.cfg.max_body, STREAM_SLACK)
        slot = self._slot(p, so_far[0] if so_far else b"") if p.compares else None
        on_done: OnDone | None = slot.on_candidate if slot is not None else None
        copy = self._streamed(p, lane, length, so_far, slack, on_done)
        if p.compares and not self._admitted:
            copy.capture_limit = p.copy_capture_uncompared
        if not lane.submit_stream(copy):
            self.outcomes[lane.target] = DROPPED
            if slot is not None:
                slot.copy_dropped()
            return
        self.outcomes[lane.target] = SENT
        streamed = self.streamed
        if streamed is None:
            streamed = self.streamed = BodyStream()
        streamed.copies.append(copy)
        sec = p.secondary
        if slot is None or sec is None:
            return
        second = self._streamed(p, sec, length, so_far, slack, slot.on_secondary)
        if sec.submit_stream(second):
            streamed.copies.append(second)
        else:
            slot.copy_dropped()

    def _streamed(
        self,
        p: LanePlan,
        lane: ShadowLane,
        length: int,
        so_far: list[bytes],
        slack: int,
        on_done: OnDone | None,
    ) -> StreamedCopy:
        req = self._request
        chunked = length < 0
        endpoint = lane.pool.pick()
        head = p.builder.head(req, self._base, max(length, 0), endpoint.authority, chunked=chunked)
        return StreamedCopy(lane, req.method, head, chunked, so_far, slack, on_done, endpoint)

    # ----- building and handing over copies -----
    def _submit(self, p: LanePlan, body: Body | None) -> None:
        if body is None or body.size > p.cfg.max_body:
            self._outcome(p, SKIPPED_BODY)
            self._unsent_write(p, None, DIV_SKIPPED_BODY, "body too big to keep")
            return
        if p.writes is not None:
            self._submit_write(p, p.writes, body)
            return
        dropped, slot, head = self._hand_over(p, body)
        if dropped or slot is None or p.secondary is None:
            return
        req = self._request
        sep = p.secondary.pool.pick()
        shead = (
            head
            if not p.builder.host_is_endpoint
            else p.builder.head(req, self._base, body.size, sep.authority)
        )
        second = ShadowCopy(p.secondary, req.method, shead, body, slot.on_secondary, sep)
        if not p.secondary.submit(second):
            slot.copy_dropped()

    def _submit_write(self, p: LanePlan, w: WritePlan, body: Body) -> None:
        """A copy of an ordered or id-rewriting shadow: built from the primary's answer, sent
        in its scope's order, checked at its end; whatever may leave the target unlike the
        primary is written to the divergence ledger.

        A big `_bulk` is built by the write worker, off the loop: its place in the scope's
        `BuildLine` keeps the copies of the scope behind it waiting until it is admitted, and
        its outcome is decided then (after the access log line, which does not list it)."""
        req = self._request
        capture = self.capture
        answer = capture.result if capture is not None else None
        scope = p.lane.scope
        line = scope.line if scope is not None else None
        worker = w.worker
        if worker is not None and w.offloads(req, body.size, answer):
            place = line.reserve() if line is not None else None

            def built(prep: Prepared | Unsent | None) -> None:
                if place is None:
                    self._write_built(p, w, body, prep)
                    return
                assert line is not None
                line.ready(place, lambda: self._write_built(p, w, body, prep))

            refused = worker.prepare(w.ids, w.barrier, req.method, req.target, body,
                                     self._status, answer, built)  # fmt: skip
            if not refused:
                return
            # full, or no child: the copy is dropped, as a full lane drops it
            p.lane.drop()
            self._dropped(p)
            keys = w.unsent_keys(req, None)  # the whole scope: the body is not parsed here
            w.diverged(keys, DIV_DROPPED, req.request_id, req.method, self._uri(), refused)
            if place is not None and line is not None:
                line.ready(place, _nothing)
            return
        prep = w.prepare(req, body.data(), self._status, answer)
        if line is not None and line.busy:
            line.ready(line.reserve(), lambda: self._write_built(p, w, body, prep))
            return
        self._write_built(p, w, body, prep)

    def _write_built(
        self, p: LanePlan, w: WritePlan, body: Body, prep: Prepared | Unsent | None
    ) -> None:
        """Hand a built write copy to its lane, or say why there is none (None: the write
        worker died building it)."""
        req = self._request
        if prep is None:
            self._outcome(p, SKIPPED_ANSWER)
            w.diverged(w.unsent_keys(req, None), DIV_DROPPED, req.request_id, req.method,
                       self._uri(), "write worker lost the copy")  # fmt: skip
            return
        if isinstance(prep, Unsent):
            self._outcome(p, SKIPPED_ANSWER if prep.divergent else SKIPPED_STATUS)
            if prep.divergent:
                w.diverged(prep.keys, DIV_PRIMARY_UNUSABLE, req.request_id, req.method,
                           self._uri(), prep.reason)  # fmt: skip
            return
        dropped, _, _ = self._hand_over(p, body_of(prep.body), w, prep)
        if not dropped:
            return
        if prep.job:  # its documents are known to the worker only
            w.ended_there(prep, DIV_DROPPED, dropped, 0, None, req.request_id, self._uri())
        else:
            w.diverged(prep.keys, DIV_DROPPED, req.request_id, prep.method, self._uri(), dropped)

    def _hand_over(
        self, p: LanePlan, body: Body, w: WritePlan | None = None, prep: Prepared | None = None
    ) -> tuple[str, CompareSlot | None, bytes]:
        """Build one copy (of the request, or of a write step's `prep`) and give it to its
        lane: the circuit and the lane's bounds first, then the head, the comparison slot,
        the recording tap. Returns why it was dropped ("" when the lane took it), its slot and
        its head."""
        lane = p.lane
        req = self._request
        kept = prep.kept if prep is not None else 0
        if lane.breaker.is_open():
            lane.fail_open()
            self._dropped(p)
            return "circuit open", None, b""
        if lane.full(body.size + kept):
            lane.drop()
            self._dropped(p)
            return "queue full", None, b""
        endpoint = lane.pool.pick()
        method = prep.method if prep is not None else req.method
        target = prep.target if prep is not None else None
        head = p.builder.head(req, self._base, body.size, endpoint.authority, method, target)
        slot = self._slot(p, body.prefix(EXAMPLE_REQUEST_BODY)) if p.compares else None
        on_done: OnDone | None = slot.on_candidate if slot else None
        if w is not None and prep is not None:
            on_done = WriteEnd(w, prep, req.request_id, self._uri(), slot).on_done
        tap: CopyRecording | None = None
        if p.recorder is not None and p.recorder.wants(req):
            tap = CopyRecording(p.recorder, head, body.data(), req.request_id, on_done)
            if p.recorder.answers:
                on_done = tap.on_done
        copy = ShadowCopy(lane, method, head, body, on_done, endpoint, kept)
        if p.compares and not self._admitted:
            copy.capture_limit = p.copy_capture_uncompared
        if lane.submit(copy, prep.keys if prep is not None else None):
            self.outcomes[lane.target] = SENT
            if tap is not None and not tap.recorder.answers:
                tap.sent()
            return "", slot, head
        self.outcomes[lane.target] = DROPPED
        if slot is not None:
            slot.copy_dropped()
        return "queue full", None, head

    def _unsent_write(
        self, p: LanePlan, body: Body | None, reason: DivergenceReason, detail: str
    ) -> None:
        """A write copy that will not be built: the ledger marks its keys suspect."""
        w = p.writes
        if w is None:
            return
        req = self._request
        keys = w.unsent_keys(req, body.data() if body is not None else None)
        w.diverged(keys, reason, req.request_id, req.method, self._uri(), detail)

    def _uri(self) -> str:
        return self._request.target.decode("latin-1")

    def _dropped(self, p: LanePlan) -> None:
        """Not handed over (circuit open, lane full): the lane counted it; no comparison."""
        self.outcomes[p.lane.target] = DROPPED
        if p.compares:  # admitted or not: not counted yet
            self._metrics.comparison(p.lane.route, p.lane.target, COMPARISON_DROPPED)

    def _slot(self, p: LanePlan, example: bytes) -> CompareSlot | None:
        """The comparison of this copy (`example`: the request body's first bytes, for the
        report), or None when it is not compared."""
        if not self._admitted:
            self._metrics.comparison(p.lane.route, p.lane.target, COMPARISON_DROPPED)
            return None
        capture = self.capture
        if capture is None or self._compare_submit is None:
            return None
        req = self._request
        job = CompareJob(
            route=p.lane.route,
            target=p.lane.target,
            request_id=req.request_id,
            method=req.method,
            uri=req.target.decode("latin-1"),
            request_body=example[:EXAMPLE_REQUEST_BODY],
            primary=EMPTY,
            candidate=EMPTY,
            secondary=None,
            settings=p.compare_settings,
        )
        slot = CompareSlot(job, p.secondary is not None, self._compare_submit, self._metrics)
        capture.attach(slot)
        return slot

    def _outcome(self, p: LanePlan, outcome: Outcome) -> None:
        self.outcomes[p.lane.target] = outcome
        self._metrics.shadow_outcome(p.lane.route, p.lane.target, outcome)


def _nothing() -> None:
    """The place of a copy that was dropped before it was built: nothing to admit."""


class CopyRecording:
    """A shadow's recording of one copy: recorded when sent, or, with `answers`, when its
    answer is in (then it sits in front of the copy's own `on_done`, which it calls)."""

    __slots__ = ("body", "head", "next", "recorder", "request_id", "ts_ns")

    def __init__(
        self, recorder: Recorder, head: bytes, body: bytes, request_id: str, nxt: OnDone | None
    ) -> None:
        self.recorder = recorder
        self.head = head
        self.body = body
        self.request_id = request_id
        self.ts_ns = time.time_ns()
        self.next = nxt

    def sent(self) -> None:
        self.recorder.copy(self.head, self.body, self.request_id, self.ts_ns, None)

    def on_done(self, copy: ShadowCopy, result: ShadowResult) -> None:
        outcome = result.outcome
        # not sent at all (circuit open, dropped from the queue): nothing to record
        if outcome != CIRCUIT_OPEN and outcome != COPY_DROPPED:
            latency = time.time_ns() - self.ts_ns
            self.recorder.copy(self.head, self.body, self.request_id, self.ts_ns,
                               captured(result), latency)  # fmt: skip
        if self.next is not None:
            self.next(copy, result)
