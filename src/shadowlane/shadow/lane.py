"""A lane: one shadow target of one route, with its own pool, bounds, ordering and outcomes.

Isolation is structural: a copy is handed to a lane with `submit()`, which never waits. It
starts at once if fewer than `max_in_flight` copies are running, waits in a bounded queue
otherwise, and is dropped (counted) when the queue is full. Every copy has a deadline
(`timeout`), so a hung target holds at most `max_in_flight` connections and `queue` copies.

Ordered copies (`order`, `ordered_by`) first wait in their ordering scope (shadow/ordering.py)
until no earlier copy with a conflicting key is pending; that wait counts against `queue` and
the byte bound like a wait for a slot, and the copy is "parked" meanwhile. When the scope lets
it go it takes a slot or waits for one like any copy. Its end releases its keys.

A target that fails trips the lane's circuit breaker (shadow/breaker.py): when it opens, the
waiting copies are shed at once and new ones are not even built, so a hung or dead target costs
a few probes a second, not a connect and a timer for every copy.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from shadowlane.shadow.breaker import CircuitBreaker
from shadowlane.shadow.keys import OrderKeys
from shadowlane.shadow.ordering import OrderScope, Waiter
from shadowlane.shadow.outcomes import (
    ABORTED,
    CIRCUIT_OPEN,
    COPY_DROPPED,
    DROPPED,
    ERROR,
    OK,
    PENDING,
    SENT,
    TIMEOUT,
    CopyEnd,
    Ended,
)
from shadowlane.wire.messages import EMPTY_BODY, Body, Headers
from shadowlane.wire.upstream import (
    IDEMPOTENT,
    BackendPool,
    EndpointPool,
    ResponseSink,
    UpstreamConnection,
    UpstreamError,
)

if TYPE_CHECKING:
    from shadowlane.metrics import Metrics

#: copies in flight and waiting may pin at most this many body bytes per lane (bodies are
#: shared with the primary and other lanes, so this over-counts, which errs on the safe side)
MAX_LANE_BYTES = 64 * 1024 * 1024
#: ... and all lanes of the process together at most this many (every generation's lanes,
#: replay's too): with many shadows and big uploads, 64 MiB per lane alone would let a process
#: pin hundreds of MiB. Over-counts the same way (a body shared by two lanes counts twice).
MAX_PROCESS_BYTES = 256 * 1024 * 1024


#: a streamed copy (`stream_body`) may fall behind the primary by the shadow's `max_body`, but
#: by at least this much: while its connection opens (a few loop turns, even on loopback) the
#: proxy may read 256 KiB from a fast client on each turn, and a copy aborted for that would
#: abort every stream that finds no idle connection
STREAM_SLACK = 4 * 1024 * 1024


class PinnedBytes:
    """Body bytes pinned by shadow copies of every lane in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0


#: the one budget every lane of the process draws from
PROCESS_PINNED = PinnedBytes(MAX_PROCESS_BYTES)


class ShadowResult:
    """What came back from the target, for comparison (only kept when the lane compares)."""

    __slots__ = ("body", "body_truncated", "headers", "outcome", "seconds", "status", "trailers")

    def __init__(self) -> None:
        self.status = 0
        self.headers: Headers = []
        self.trailers: Headers = []
        self.body = b""
        self.body_truncated = False
        self.outcome: CopyEnd = PENDING
        self.seconds = 0.0


OnDone = Callable[["ShadowCopy", ShadowResult], None]


class ShadowCopy(ResponseSink):
    """One copy on its way to a target; the upstream connection's ResponseSink."""

    __slots__ = (
        "_chunks",
        "_size",
        "body",
        "capture_limit",
        "conn",
        "connecting",
        "done",
        "endpoint",
        "head",
        "lane",
        "method",
        "on_done",
        "result",
        "retried",
        "size",
        "t0",
        "timer",
        "waiter",
    )

    def __init__(
        self,
        lane: ShadowLane,
        method: str,
        head: bytes,
        body: Body,
        on_done: OnDone | None,
        endpoint: EndpointPool | None = None,
        extra_bytes: int = 0,
    ) -> None:
        self.lane = lane
        #: chosen when the copy is built (its Host may name it); else at start
        self.endpoint = endpoint
        self.method = method
        self.head = head
        self.body = body
        #: bytes this copy pins while it waits or runs: its body, and what its end still needs
        #: (the primary's answer, to check a `_bulk` item by item)
        self.size = body.size + extra_bytes
        #: its place in its ordering scope, while it holds or waits for keys
        self.waiter: Waiter | None = None
        self.on_done = on_done
        self.conn: UpstreamConnection | None = None
        #: the task getting this copy a connection, while it does
        self.connecting: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.result = ShadowResult()
        self._chunks: list[bytes] = []
        self._size = 0
        #: how much of this copy's answer to keep: the lane's, or less when the request's
        #: comparison was not admitted (the comparator was full when it began)
        self.capture_limit = lane.capture_limit
        self.done = False
        self.retried = False
        self.t0 = 0.0

    def start(self) -> None:
        lane = self.lane
        loop = lane.loop
        self.t0 = loop.time()
        if not lane.breaker.admit():
            self.fail_fast()
            return
        self._start_deadline()
        if self.endpoint is None:
            self.endpoint = lane.pool.pick()
        conn = self.endpoint.get_idle()
        if conn is not None:
            self._send(conn)
        else:
            self.connecting = loop.create_task(self._connect(fresh=False))

    def _start_deadline(self) -> None:
        """Arm the copy's deadline (`timeout`), from its start."""
        lane = self.lane
        self.timer = lane.loop.call_later(lane.timeout, self._on_deadline)

    async def _connect(self, fresh: bool) -> None:
        ep = self.endpoint
        assert ep is not None  # set by start()
        try:
            conn = await (ep.connect() if fresh else ep.acquire())
        except UpstreamError as err:
            self.connecting = None
            if self.done:
                return
            self._finish(TIMEOUT if err.kind == "timeout" else ERROR)
            return
        self.connecting = None
        if self.done:
            conn.close()
            return
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.send_request(self.head, self, self.lane.timeout, head_request=self.method == "HEAD")
        body = self.body
        if body.size:
            conn.write_parts(body.parts)
        conn.end_request()
        self.lane.metrics.shadow_outcome(self.lane.route, self.lane.target, SENT)

    # ResponseSink
    def on_response_head(
        self, status: int, reason: bytes, headers: Headers, content_length: int | None
    ) -> None:
        self.result.status = status
        self.result.headers = headers

    def on_response_body(self, data: bytes) -> None:
        limit = self.capture_limit
        if self._size < limit:
            self._chunks.append(data[: limit - self._size])
        elif limit:
            self.result.body_truncated = True
        self._size += len(data)

    def on_response_trailers(self, trailers: Headers) -> None:
        self.result.trailers = trailers

    def on_response_end(self) -> None:
        if self._chunks:
            self.result.body = b"".join(self._chunks)
            self._chunks = []
        self._finish(OK)

    def on_upstream_error(self, err: UpstreamError, retryable: bool) -> None:
        if self.done:
            return
        if retryable and not self.retried and self.method in IDEMPOTENT:
            self.retried = True
            self.conn = None
            self.connecting = self.lane.loop.create_task(self._connect(fresh=True))
            return
        self._finish(TIMEOUT if err.kind == "timeout" else ERROR)

    def on_upstream_writable(self, writable: bool) -> None:
        """The body is already in memory: nothing to pause."""

    def on_data_end(self) -> None:
        """Nothing is relayed, so nothing to flush."""

    def _on_deadline(self) -> None:
        self.timer = None
        if not self.done:
            if self.conn is not None:
                self.conn.abandon()
            self._finish(TIMEOUT)

    def _finish(self, outcome: Ended, fault: bool = True) -> None:
        """The copy's one end. `fault`: a failure that counts against the target for its
        breaker (a streamed copy aborted because the client's body was cut does not)."""
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        connecting = self.connecting
        if connecting is not None:
            # the deadline passed (or the lane drains) mid-connect: a connect left running
            # would hold a socket and a pool slot until connect_timeout after the lane freed
            # the copy's slot, so a target that drops SYNs could pile up half-open sockets
            self.connecting = None
            connecting.cancel()
        lane = self.lane
        seconds = lane.loop.time() - self.t0
        result = self.result
        result.outcome = outcome
        result.seconds = seconds
        lane.metrics.shadow_outcome(lane.route, lane.target, outcome)
        if outcome == OK:
            lane.metrics.observe_shadow(lane.route, lane.target, seconds)
            lane.breaker.succeeded()
        elif fault and lane.breaker.failed():
            lane.shed_waiting()
        if connecting is not None and not connecting.done():
            # the cancelled connect closes its socket when its task next runs: the slot is
            # given back then, so the next copy's connect never overlaps this one's and the
            # lane holds at most max_in_flight sockets, half-open ones included
            connecting.add_done_callback(self._connect_ended)
        else:
            lane.copy_done(self)
        if self.on_done is not None:
            self.on_done(self, result)

    def _connect_ended(self, _task: asyncio.Task[None]) -> None:
        self.lane.copy_done(self)

    def abandon(self) -> None:
        if self.conn is not None:
            self.conn.abandon()
        self._finish(TIMEOUT)

    def fail_fast(self) -> None:
        """Not sent: the lane's circuit is open. Counted `dropped`; no connection is tried."""
        self.done = True
        result = self.result
        result.outcome = CIRCUIT_OPEN
        lane = self.lane
        lane.metrics.shadow_outcome(lane.route, lane.target, DROPPED)
        lane.copy_done(self)
        if self.on_done is not None:
            self.on_done(self, result)


class StreamedCopy(ShadowCopy):
    """A copy whose body goes to the target as the proxy reads it from the client
    (`stream_body`), for a body too big to keep (over the shadow's `max_body`).

    It is handed the body's bytes so far when it is made, then `feed`s every further chunk
    (the bytes objects the primary was written, never copied) and the `end`. It never slows
    the client: nothing waits for it. What it may hold unsent (chunks while it connects, or
    its transport's write buffer once connected) is bounded by `bound`; past it, or if the
    target fails while the body still streams, or the body is cut, it is `abort`ed: its
    connection is reset (never pooled, its buffer freed) and it ends `aborted`. It is never
    retried (the body is gone), and its deadline (`timeout`) runs from the body's end: the
    body takes as long as the client takes. Once the body ended it is an ordinary copy: its
    answer ends it `ok`, `error` or `timeout`.
    """

    __slots__ = ("bound", "chunked", "ended", "paused", "pending", "pending_bytes")

    def __init__(
        self,
        lane: ShadowLane,
        method: str,
        head: bytes,
        chunked: bool,
        so_far: list[bytes],
        slack: int,
        on_done: OnDone | None,
        endpoint: EndpointPool | None = None,
    ) -> None:
        handed = 0
        for chunk in so_far:
            handed += len(chunk)
        # the most it may hold unsent before it is aborted: what it is handed at its start,
        # then `slack` more. That is what it pins for the lane's and the process's byte
        # bounds (never the whole body)
        bound = slack + handed
        super().__init__(lane, method, head, EMPTY_BODY, on_done, endpoint, bound)
        self.chunked = chunked
        self.bound = bound
        #: chunks not written yet (while it connects): the same bytes objects, a new list
        self.pending: list[bytes] = list(so_far)
        self.pending_bytes = handed
        #: the body ended (all of it was fed, or is pending)
        self.ended = False
        #: the transport said its buffer passed its high-water mark: check it per chunk
        self.paused = False

    def _start_deadline(self) -> None:
        """No deadline while the body streams (the client sets its pace); `end` arms it."""

    def feed(self, chunk: bytes) -> None:
        """The next chunk of the body, as the proxy read it (never waits)."""
        if self.done:
            return
        conn = self.conn
        if conn is None:
            self.pending.append(chunk)
            self.pending_bytes += len(chunk)
            if self.pending_bytes > self.bound:
                self.abort(True)  # the target is slower to accept than the client to send
            return
        self._write(conn, chunk)
        if self.paused and conn.write_buffered() > self.bound:
            self.abort(True)  # fell behind: the target takes the body slower than the client

    def end(self) -> None:
        """The body ended: the request is complete, the deadline starts."""
        if self.done or self.ended:
            return
        self.ended = True
        conn = self.conn
        if conn is not None:
            self._end_body(conn)
        ShadowCopy._start_deadline(self)

    def abort(self, fault: bool) -> None:
        """Give up the copy: its connection is reset, its unsent bytes freed, `aborted`.
        `fault`: the target's doing (fell behind, failed), counted against its breaker."""
        if self.done:
            return
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.reset()
        self._finish(ABORTED, fault)

    def _write(self, conn: UpstreamConnection, chunk: bytes) -> None:
        if self.chunked:
            conn.write_chunk_parts(chunk)
        else:
            conn.write_body(chunk)

    def _end_body(self, conn: UpstreamConnection) -> None:
        if self.chunked:
            conn.write_last_chunk()
        conn.end_request()

    def _send(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.send_request(self.head, self, self.lane.timeout)
        pending = self.pending
        self.pending = []
        self.pending_bytes = 0
        for chunk in pending:
            self._write(conn, chunk)
        if self.ended:
            self._end_body(conn)
        self.lane.metrics.shadow_outcome(self.lane.route, self.lane.target, SENT)

    def on_upstream_error(self, err: UpstreamError, retryable: bool) -> None:
        """Never retried: the body already sent is not kept. While the body streams the copy
        is aborted (a connection idle for `timeout` then is the client's pause, not the
        target's fault); after it, an ordinary `error` or `timeout`."""
        if self.done:
            return
        if not self.ended:
            self.abort(err.kind != "timeout")
            return
        self._finish(TIMEOUT if err.kind == "timeout" else ERROR)

    def on_upstream_writable(self, writable: bool) -> None:
        self.paused = not writable

    def abandon(self) -> None:
        """Shutdown (the lane drains): mid-body it is aborted, after it timed out."""
        if not self.ended:
            self.abort(False)
            return
        super().abandon()

    def fail_fast(self) -> None:
        self.pending = []  # the bytes it was handed go with it
        self.pending_bytes = 0
        super().fail_fast()

    def _finish(self, outcome: Ended, fault: bool = True) -> None:
        if not self.ended and outcome in (ERROR, TIMEOUT):
            outcome = ABORTED  # a connect that failed while the body streamed
        self.pending = []
        self.pending_bytes = 0
        super()._finish(outcome, fault)


class BodyStream:
    """The streamed copies of one request's body; the proxy feeds it as it reads the client
    (shadow/ticket.py makes it; it never waits and never pauses the client)."""

    __slots__ = ("copies",)

    def __init__(self) -> None:
        self.copies: list[StreamedCopy] = []

    def feed(self, chunk: bytes) -> None:
        for copy in self.copies:
            copy.feed(chunk)

    def end(self) -> None:
        for copy in self.copies:
            copy.end()

    def cut(self) -> None:
        """The client's body will not end (it left, or the proxy refused the rest): every
        copy still streaming is aborted, not counted against its target."""
        for copy in self.copies:
            if not copy.ended:
                copy.abort(False)


class ShadowLane:
    """Bounds, ordering and the pool of one (route, shadow target) pair."""

    def __init__(
        self,
        route: str,
        target: str,
        pool: BackendPool,
        metrics: Metrics,
        *,
        timeout: float,
        max_in_flight: int,
        queue: int,
        capture_limit: int = 0,
        scope: OrderScope | None = None,
    ) -> None:
        self.route = route
        self.target = target
        self.pool = pool
        self.metrics = metrics
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.queue_limit = queue
        #: the ordering scope this lane's copies are admitted to (None: unordered)
        self.scope = scope
        self.capture_limit = capture_limit
        self.loop = asyncio.get_running_loop()
        self.in_flight: set[ShadowCopy] = set()
        self.waiting: deque[ShadowCopy] = deque()
        #: copies waiting: in `waiting` (for an in-flight slot) or `parked` (for their keys)
        self.waiting_count = 0
        #: bytes pinned by the copies in flight and waiting
        self.bytes = 0
        #: ordered copies waiting in the scope for an earlier conflicting copy to end
        self.parked: set[ShadowCopy] = set()
        #: draining past its deadline: nothing new starts
        self.closing = False
        self.paused = False
        self.breaker = CircuitBreaker(self.loop.time)

    def pause(self) -> None:
        """Runtime control: copy nothing, whatever the percent; the dispatcher still counts each
        request (`sampled_out`), so a paused shadow accounts for all of them."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def full(self, size: int) -> bool:
        """Would a copy be dropped now? Checked before a copy is built, so an overloaded lane
        costs one comparison per request, not a head to build and throw away."""
        if self.bytes + size > MAX_LANE_BYTES:
            return True
        pinned = PROCESS_PINNED
        if pinned.bytes + size > pinned.limit:
            return True
        if len(self.in_flight) < self.max_in_flight:
            return False  # an ordered copy that must wait for its keys is checked at submit
        return self.waiting_count >= self.queue_limit

    def submit(self, copy: ShadowCopy, keys: OrderKeys | None = None) -> bool:
        """Start, queue or drop a copy; never waits. Returns False when dropped.

        An ordered lane admits the copy to its scope with `keys` first; the copy is parked
        there until its keys are free (at once, mostly)."""
        size = copy.size
        pinned = PROCESS_PINNED
        if self.bytes + size > MAX_LANE_BYTES or pinned.bytes + size > pinned.limit:
            return self.drop()
        if self.closing:
            return self.drop()
        scope = self.scope
        if scope is not None and keys is not None:
            waiter = scope.waiter(keys, lambda: self._unpark(copy))
            copy.waiter = waiter
            if scope.admit(waiter):  # free to go: a slot or the queue, as any copy
                if self._start_or_queue(copy):
                    return True
                copy.waiter = None
                scope.release(waiter)
                return False
            if self.waiting_count >= self.queue_limit:
                copy.waiter = None
                scope.release(waiter)  # no room to wait for its keys: it leaves the scope
                return self.drop()
            self.waiting_count += 1
            self._pin(size)
            self.parked.add(copy)
            return True
        return self._start_or_queue(copy)

    def submit_stream(self, copy: StreamedCopy) -> bool:
        """Start a streamed copy now, or drop it: a stream cannot wait for a slot (its body
        goes by once), so it is never queued. Its bound is pinned as its size."""
        size = copy.size
        pinned = PROCESS_PINNED
        if (
            self.closing
            or len(self.in_flight) >= self.max_in_flight
            or self.bytes + size > MAX_LANE_BYTES
            or pinned.bytes + size > pinned.limit
        ):
            return self.drop()
        self._pin(size)
        self.in_flight.add(copy)
        copy.start()
        return True

    def _start_or_queue(self, copy: ShadowCopy) -> bool:
        size = copy.size
        if len(self.in_flight) < self.max_in_flight:
            self._pin(size)
            self.in_flight.add(copy)
            copy.start()
            return True
        if self.waiting_count >= self.queue_limit:
            return self.drop()
        self.waiting.append(copy)
        self.waiting_count += 1
        self._pin(size)
        return True

    def _unpark(self, copy: ShadowCopy) -> None:
        """The scope let a parked copy go: a slot now, or the front of the slot queue (it has
        waited longer than the copies queued behind it)."""
        if self.closing:  # the drain ends every copy it took out of `parked`
            return
        self.parked.discard(copy)
        if len(self.in_flight) < self.max_in_flight:
            self.waiting_count -= 1
            self.in_flight.add(copy)
            copy.start()
        else:
            self.waiting.appendleft(copy)

    def drop(self) -> bool:
        self.metrics.shadow_outcome(self.route, self.target, DROPPED)
        return False

    def _pin(self, size: int) -> None:
        self.bytes += size
        PROCESS_PINNED.bytes += size

    def _unpin(self, size: int) -> None:
        self.bytes -= size
        PROCESS_PINNED.bytes -= size

    def copy_done(self, copy: ShadowCopy) -> None:
        self.in_flight.discard(copy)
        self._unpin(copy.size)
        waiter = copy.waiter
        if waiter is not None:
            copy.waiter = None
            assert self.scope is not None
            self.scope.release(waiter)  # may unpark copies of this lane or of others
        while self.waiting and len(self.in_flight) < self.max_in_flight and not self.closing:
            nxt = self.waiting.popleft()
            self.waiting_count -= 1
            self.in_flight.add(nxt)
            nxt.start()

    def _end_unsent(self, copy: ShadowCopy, end: CopyEnd) -> None:
        """A copy that waited ends without being sent (circuit open, drain): it gives back its
        bytes and keys, and its owner hears why."""
        copy.done = True
        copy.result.outcome = end
        self._unpin(copy.size)
        waiter = copy.waiter
        if waiter is not None:
            copy.waiter = None
            assert self.scope is not None
            self.scope.release(waiter)
        if copy.on_done is not None:
            copy.on_done(copy, copy.result)

    def circuit_open(self) -> bool:
        """Is the breaker shedding copies now (the `shadowlane_shadow_circuit_open` gauge)?"""
        return self.breaker.is_open()

    def fail_open(self) -> None:
        """A copy not even built: the circuit is open (counted `dropped`, like a fast fail)."""
        self.metrics.shadow_outcome(self.route, self.target, DROPPED)

    def shed_waiting(self) -> None:
        """The circuit opened: the copies waiting for a slot end now. Parked copies stay in
        their scope (their order still matters); they fail fast when their turn comes."""
        waiting = list(self.waiting)
        if not waiting:
            return
        self.waiting.clear()
        self.waiting_count -= len(waiting)
        for copy in waiting:
            self._end_unsent(copy, CIRCUIT_OPEN)
        self.metrics.shadow_outcome(self.route, self.target, DROPPED, len(waiting))

    async def drain(self, deadline: float) -> None:
        """Give in-flight copies until `deadline` (loop time); then abandon what is left."""
        while (self.in_flight or self.waiting_count) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.closing = True
        left = [*self.waiting, *self.parked]
        self.waiting.clear()
        self.parked.clear()
        self.waiting_count -= len(left)
        for copy in left:
            self.metrics.shadow_outcome(self.route, self.target, DROPPED)
            self._end_unsent(copy, COPY_DROPPED)
        for copy in list(self.in_flight):
            copy.abandon()
        self.pool.close()
