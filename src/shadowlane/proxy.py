"""The primary path: match a route, pick the backend, forward, stream the answer back.

One `ProxyCall` per request carries it from the downstream `Exchange` to a pooled upstream
connection and back, as callbacks (it is the upstream connection's `ResponseSink`). A shadowed
request carries the ticket the dispatcher gave it, and tells it, never awaiting anything, when
the request body is complete (`send: with_request` copies go then), when the primary answer
ended (`after_response`), and when the body of a request answered early is complete. A body
too big to keep for a `stream_body` shadow is streamed to it instead: the ticket makes the
copies (`ShadowTicket.stream`) and the proxy feeds them each chunk it reads (`BodyStream`),
never pausing the client for them. Shadow imports nothing from here: the ticket is handed what
it needs at each moment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, assert_never

from shadowlane.record.recorder import Recorder
from shadowlane.routing import Route, RouteTable
from shadowlane.shadow.join import PrimaryCapture
from shadowlane.shadow.lane import BodyStream
from shadowlane.shadow.mutation import RequestRewrite
from shadowlane.shadow.plan import NEVER, RouteShadows
from shadowlane.shadow.ticket import ShadowTicket
from shadowlane.wire.headers import (
    new_request_id,
    response_fields,
    serialize_headers,
    upstream_request_headers,
)
from shadowlane.wire.messages import EMPTY_BODY, Body, Headers, Request
from shadowlane.wire.overload import REFUSE, SHED, OverloadState
from shadowlane.wire.server import Exchange
from shadowlane.wire.upstream import (
    IDEMPOTENT,
    BackendPool,
    EndpointPool,
    ResponseSink,
    UpstreamConnection,
    UpstreamError,
    UpstreamErrorKind,
)

if TYPE_CHECKING:
    from shadowlane.metrics import Metrics
    from shadowlane.shadow.dispatcher import ShadowDispatcher

#: request bodies up to this size are kept so a stale-connection retry can resend them
RETRY_BODY_LIMIT = 64 * 1024

#: (request, route, backend, status, seconds, shadow outcomes) -> None
AccessLog = Callable[[Request, str, str, int, float, "dict[str, str] | None"], None]
#: an upgrade request (`Exchange.upgrade` set) of a route, with its backend and start time:
#: True when it was taken (tunnelled, or answered), False to serve it as a plain request
UpgradeHook = Callable[[Exchange, "RouteRuntime", BackendPool, float], bool]


def gateway_status(kind: UpstreamErrorKind) -> int:
    """The status a client gets when the primary failed before its answer started: 504 when
    the backend was too slow, 503 when the pool had no connection to spare, 502 otherwise."""
    if kind == "timeout":
        return 504
    if kind == "overflow":
        return 503
    if kind == "refused" or kind == "tls" or kind == "reset" or kind == "protocol":
        return 502
    assert_never(kind)  # a new kind must choose its status here (mypy checks)


class RouteRuntime:
    """What the proxy precomputes per route: limits, the request rewrite, the shadow plan and
    the recording."""

    __slots__ = (
        "body_check",
        "max_body",
        "name",
        "recorder",
        "retain_limit",
        "rewrite",
        "route",
        "shadows",
    )

    def __init__(
        self,
        route: Route,
        max_body: int,
        shadows: RouteShadows | None,
        recorder: Recorder | None = None,
        rewrite: RequestRewrite | None = None,
    ) -> None:
        self.route = route
        self.name = route.name
        self.max_body = max_body
        self.shadows = shadows
        #: `record:` of the route (None: not recorded, one test per request)
        self.recorder = recorder
        #: the route's changes to the forwarded request (None: forwarded as it came, one
        #: test per request)
        self.rewrite = rewrite
        self.retain_limit = max(
            RETRY_BODY_LIMIT,
            shadows.max_body if shadows else 0,
            recorder.max_body if recorder is not None else 0,
        )
        #: the one size a body's chunks are compared with as they are kept: past it, the
        #: body may start streaming to a `stream_body` shadow, or outgrows retain_limit
        self.body_check = min(
            self.retain_limit, shadows.stream_at if shadows is not None else NEVER
        )


class Proxy:
    """The application the downstream server dispatches to."""

    def __init__(
        self,
        routes: RouteTable,
        runtimes: dict[str, RouteRuntime],
        backends: dict[str, BackendPool],
        metrics: Metrics,
        shadow: ShadowDispatcher | None = None,
        access_log: AccessLog | None = None,
        proto: bytes = b"http",
        overload: OverloadState | None = None,
    ) -> None:
        self.routes = routes
        self.runtimes = runtimes
        self.backends = backends
        self.metrics = metrics
        self.shadow = shadow
        self.access_log = access_log
        self.proto = proto
        #: the listener's overload level (written by its sweep): one int compare per request
        self.overload = overload if overload is not None else OverloadState()
        self._retry_after: Headers = [(b"retry-after", b"1")]
        self.loop = asyncio.get_running_loop()
        #: bound once: `loop.time()` by name costs a method lookup per call
        self.time: Callable[[], float] = self.loop.time
        #: upgrade requests (WebSocket) go here (`shadowlane.upgrades`); None: served plain
        self.on_upgrade: UpgradeHook | None = None

    def handle(self, exchange: Exchange) -> None:
        req = exchange.request
        t0 = self.time()
        if self.overload.level >= REFUSE:
            self._refuse(exchange, t0)
            return
        route = self.routes.match(req)
        if route is None:
            exchange.respond(404, b"no route matches this request\n")
            self._answered(req, "", 404, t0)
            return
        rt = self.runtimes[route.name]
        if exchange.content_length is not None and exchange.content_length > rt.max_body:
            exchange.respond(413, b"request body too large\n", close=True)
            self._answered(req, rt.name, 413, t0)
            return
        backend = self.backends[route.pick_backend()]
        # the one test an ordinary request pays: the server sets `upgrade` only when llhttp
        # stopped at an upgrade request
        if (
            exchange.upgrade
            and self.on_upgrade is not None
            and self.on_upgrade(exchange, rt, backend, t0)
        ):
            return
        ProxyCall(self, exchange, rt, backend, t0).start()

    def _refuse(self, exchange: Exchange, t0: float) -> None:
        """Overloaded: 503 with Retry-After before routing, so no backend sees the request
        (Envoy's stop_accepting_requests action). The connection closes: a client that
        retries comes back on a new one, which a load balancer may send elsewhere."""
        after = str(self.overload.retry_after).encode()
        if self._retry_after[0][1] != after:
            self._retry_after = [(b"retry-after", after)]
        exchange.respond(503, b"overloaded, retry later\n", close=True, headers=self._retry_after)
        self.metrics.limit_hit("overload")
        self._answered(exchange.request, "", 503, t0)

    def _answered(self, req: Request, route: str, status: int, t0: float) -> None:
        """Account for an answer the proxy gave itself, before any backend was chosen."""
        elapsed = self.time() - t0
        self.metrics.observe_request(route, "", status, elapsed)
        if self.access_log is not None:
            req.request_id = req.header("x-request-id") or new_request_id().decode()
            self.access_log(req, route, "", status, elapsed, None)


class BodyState:
    """Where a call's request body is, for the primary, a stale-connection retry and the
    shadow copies (Final ints: compiled, each check is a C comparison).

    READING: streaming in, and kept (up to the route's retain_limit) for a retry and copies.
    LATE: the primary answered before the end; the rest is kept for the `with_request` copies.
    COMPLETE: all of it is in `body` (b"" for a request without one).
    UNKEPT: not kept, so neither a retry nor a copy can have it: it outgrew retain_limit, the
        client left before its end, or once the primary answered nobody wanted the rest.
    """

    READING: Final = 0
    LATE: Final = 1
    COMPLETE: Final = 2
    UNKEPT: Final = 3


class ProxyCall(ResponseSink):
    """One request on the primary path; the upstream connection's ResponseSink."""

    __slots__ = (
        "backend",
        "body",
        "body_size_seen",
        "body_state",
        "capture",
        "conn",
        "endpoint",
        "exchange",
        "finished",
        "head",
        "proxy",
        "rec_capture",
        "rec_ts",
        "recorder",
        "request",
        "request_id",
        "retained",
        "retried",
        "rt",
        "status",
        "stream",
        "t0",
        "ticket",
        "watch_body",
    )

    def __init__(
        self, proxy: Proxy, exchange: Exchange, rt: RouteRuntime, backend: BackendPool, t0: float
    ) -> None:
        self.proxy = proxy
        self.exchange = exchange
        self.request = exchange.request
        self.rt = rt
        self.backend = backend
        self.endpoint: EndpointPool = backend.pick()
        self.t0 = t0
        self.conn: UpstreamConnection | None = None
        #: the body's chunks while READING or LATE; the whole body once COMPLETE (its chunks,
        #: not joined: the copies write them as they came)
        self.retained: list[bytes] = []
        self.body = EMPTY_BODY
        self.body_state = BodyState.READING if exchange.has_body else BodyState.COMPLETE
        self.body_size_seen = 0
        self.retried = False
        #: the primary exchange is over (answered, failed, refused, or the client left); a
        #: client leaving later changes nothing for it
        self.finished = False
        self.status = 0
        req = self.request
        headers, rid = upstream_request_headers(
            req.headers, req.client_addr.encode(), proxy.proto, self.endpoint.authority
        )
        self.request_id = rid
        req.request_id = rid.decode("latin-1")
        #: the request as the primary is sent it: the client's, or the route's rewrite of it
        #: (which the shadow copies start from; the access log keeps the client's)
        fwd = req
        rewrite = rt.rewrite
        if rewrite is not None:
            fwd, headers = rewrite.apply(req, headers, self.endpoint.authority)
        shadow = proxy.shadow
        shadows = rt.shadows
        #: this request's shadowing, from the dispatcher it started with (a reload may swap
        #: the proxy's); None when no shadow of the route took it
        self.ticket: ShadowTicket | None = None
        #: the copies streamed in step with the primary (`stream_body`), once one is made
        self.stream: BodyStream | None = None
        #: the body goes through the streaming consumer: it streams, or (chunked) may start
        #: to on the way. The one test per request with a body that the common path pays
        self.watch_body = False
        if shadow is not None and shadows is not None:
            if proxy.overload.level >= SHED:
                shadow.shed(shadows)  # overloaded: shadow work goes first
            else:
                self.ticket = shadow.begin(shadows, req, headers, fwd, backend.name)
        #: the primary's answer as it streams by, when a compared shadow needs it
        self.capture: PrimaryCapture | None = (
            self.ticket.capture if self.ticket is not None else None
        )
        #: this request's recording (only while it is owed a record), the primary's answer as
        #: it streams by when answers are recorded, and when the request started (wall clock)
        self.recorder: Recorder | None = None
        self.rec_capture: PrimaryCapture | None = None
        self.rec_ts = 0
        rec = rt.recorder
        if rec is not None and rec.wants(req):
            self.recorder = rec
            self.rec_ts = time.time_ns()
            if rec.answers:
                self.rec_capture = PrimaryCapture(rec.max_body)
        framing = b"transfer-encoding: chunked\r\n" if exchange.chunked else b""
        self.head = (
            req.method.encode() + b" " + fwd.target + b" HTTP/1.1\r\n"
            + serialize_headers(headers) + framing + b"\r\n"
        )  # fmt: skip

    # ----- request side -----
    def start(self) -> None:
        ex = self.exchange
        ex.on_abort = self._client_gone
        ex.on_writable = self._client_writable
        ticket = self.ticket
        if ticket is not None:
            if not ex.has_body:
                # nothing to wait for: the copies go now, not after the primary connects
                ticket.request_done(EMPTY_BODY)
            elif ticket.stream_at < NEVER:
                self._may_stream(ticket, ex.content_length)
        conn = self.endpoint.get_idle()
        if conn is not None:
            self._send(conn)
        else:
            if ex.has_body:
                ex.pause_body()  # bounded: nothing is buffered while we connect
            self.proxy.loop.create_task(self._connect(fresh=False))

    def _may_stream(self, ticket: ShadowTicket, size: int | None) -> None:
        """A body on a route with a `stream_body` shadow. Over `stream_at` at the head, its
        copies start now (their connects run beside the primary's) and are fed the body as
        the primary is; a chunked one is watched, as it may pass `stream_at` on the way."""
        if size is None:
            self.watch_body = True
        elif size > ticket.stream_at:
            self.stream = ticket.stream(size, False, [])
            self.watch_body = self.stream is not None

    async def _connect(self, fresh: bool) -> None:
        try:
            if fresh:
                conn = await self.endpoint.connect()
            else:
                conn = await self.endpoint.acquire()
        except UpstreamError as err:
            self.exchange.resume_body()
            self._fail(err)
            return
        if self.finished:
            conn.close()
            return
        self.exchange.resume_body()
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        ex = self.exchange
        conn.send_request(self.head, self, self.backend.timeout, head_request=ex.head_request)
        if not ex.has_body:
            conn.end_request()
            self._request_complete()
        elif self.retried:
            # resend the body of a retried request (only retried when it was COMPLETE)
            body = self.body
            if body.size:
                if ex.chunked:
                    for part in body.parts:
                        conn.write_chunk(part)
                else:
                    conn.write_parts(body.parts)
            self._finish_body(conn)
        elif not self.watch_body:
            ex.set_body_consumer(self._on_body, self._on_body_end)
        else:
            # streaming from the first chunk: a chunked body may pass `stream_at` among the
            # chunks the server buffered, which a consumer swapped mid-replay would miss
            ex.on_body_lost = self._body_lost
            ex.set_body_consumer(self._on_body_streamed, self._on_body_end_streamed)

    def _on_body_streamed(self, chunk: bytes) -> None:
        """A chunk of a body that streams (or may) to shadows: the primary's, then the same
        bytes object to each streamed copy, which never makes the client wait."""
        stream = self.stream  # before: a stream begun by this chunk was handed it already
        self._on_body(chunk)
        if stream is not None:
            stream.feed(chunk)

    def _on_body_end_streamed(self) -> None:
        stream = self.stream
        if stream is not None:
            stream.end()
        self._on_body_end()

    def _on_body(self, chunk: bytes) -> None:
        ex = self.exchange
        self.body_size_seen += len(chunk)
        if self.finished:
            self._retain(chunk)  # the primary has answered; only the shadow copies want it
            return
        if self.body_size_seen > self.rt.max_body:
            # only chunked bodies get here (Content-Length was checked up front)
            if self.conn is not None:
                self.conn.abandon()
            if self.stream is not None:
                self.stream.cut()
            self.finished = True
            self._unkept()
            if not ex.response_started:
                ex.respond(413, b"request body too large\n", close=True)
            else:
                ex.abort()
            self._observe(413)
            if self.recorder is not None:
                self._record(None)
            return
        self._retain(chunk)
        conn = self.conn
        if conn is not None:
            self._write_chunk(conn, chunk)

    def _retain(self, chunk: bytes) -> None:
        """Keep the body for a retry and the shadow copies, while it is within retain_limit."""
        state = self.body_state
        if state != BodyState.READING and state != BodyState.LATE:
            return
        self.retained.append(chunk)
        if self.body_size_seen > self.rt.body_check:
            self._body_grew(state)

    def _body_grew(self, state: int) -> None:
        """The body passed the route's `body_check`: it may start streaming to a shadow
        (chunked, and every byte so far still kept), and past retain_limit it is not kept."""
        size = self.body_size_seen
        ticket = self.ticket
        if (
            ticket is not None
            and size > ticket.stream_at
            and state == BodyState.READING
            and not self.finished
            and self.exchange.chunked  # a Content-Length body was decided at its head
        ):
            stream = ticket.stream(size, True, self.retained)
            if stream is not None:
                self.stream = stream
        if size > self.rt.retain_limit:
            self._unkept()
            if state == BodyState.LATE:
                # the copies waiting for it cannot have it: they are decided now, and the
                # rest of the body is read and dropped by the server (unless it streams)
                if self.stream is None:
                    self.exchange.release_body()
                    self.exchange.on_body_lost = None
                if self.ticket is not None:
                    self.ticket.late_body(None)
                if self.recorder is not None:
                    self._record(None)

    def _unkept(self) -> None:
        self.body_state = BodyState.UNKEPT
        self.retained = []

    def _write_chunk(self, conn: UpstreamConnection, chunk: bytes) -> None:
        if self.exchange.chunked:
            conn.write_chunk(chunk)
        else:
            conn.write_body(chunk)

    def _on_body_end(self) -> None:
        state = self.body_state
        if self.finished and state != BodyState.LATE:
            return
        if state == BodyState.READING or state == BodyState.LATE:
            self.body = Body(self.retained, self.body_size_seen)
            self.retained = []
            self.body_state = BodyState.COMPLETE
        if self.finished:  # answered early: the copies that waited for the body go now
            if self.ticket is not None:
                self.ticket.late_body(self.body)
            if self.recorder is not None:
                self._record(self.body)
            return
        conn = self.conn
        if conn is not None:
            self._finish_body(conn)

    def _finish_body(self, conn: UpstreamConnection) -> None:
        if self.exchange.chunked:
            conn.write_last_chunk()
        conn.end_request()
        self._request_complete()

    def _request_complete(self) -> None:
        if self.ticket is not None:
            self.ticket.request_done(self._whole_body())  # the ticket acts once

    def _whole_body(self) -> Body | None:
        """The whole request body, or None when it is not (or will not be) complete."""
        return self.body if self.body_state == BodyState.COMPLETE else None

    def _shadow_response_done(self) -> None:
        """The primary exchange is over: the shadow ticket and the recording hear of it."""
        if self.ticket is not None:
            self.ticket.response_done(
                self.status, self._whole_body(), self.body_state == BodyState.LATE
            )
        if self.recorder is not None and self.body_state != BodyState.LATE:
            self._record(self._whole_body())

    def _record(self, body: Body | None) -> None:
        """Hand the request (and its answer, when recorded) to the recording, once."""
        rec = self.recorder
        if rec is None:
            return
        self.recorder = None
        cap = self.rec_capture
        rid = self.request.request_id
        chunked = self.exchange.chunked
        data = body.data() if body is not None else None
        if cap is None:
            rec.request(self.head, rid, self.rec_ts, data, None, 0, chunked)
        else:
            latency = time.time_ns() - self.rec_ts
            rec.request(self.head, rid, self.rec_ts, data, cap.result, latency, chunked)

    # ----- response side (ResponseSink) -----
    def on_response_head(
        self, status: int, reason: bytes, headers: Headers, content_length: int | None
    ) -> None:
        if self.finished:
            return
        self.status = status
        self.exchange.start_response_fields(
            status, reason, response_fields(headers), content_length
        )
        if self.capture is not None:
            self.capture.head(status, headers)
        if self.rec_capture is not None:
            self.rec_capture.head(status, headers)

    def on_response_body(self, data: bytes) -> None:
        if not self.finished:
            self.exchange.send_body(data)
            if self.capture is not None:
                self.capture.body(data)
            if self.rec_capture is not None:
                self.rec_capture.body(data)

    def on_response_trailers(self, trailers: Headers) -> None:
        if not self.finished:
            self.exchange.send_trailers(trailers)
            if self.capture is not None:
                self.capture.trailers = trailers

    def on_response_end(self) -> None:
        if self.finished:
            return
        self.finished = True
        ex = self.exchange
        if ex.has_body and not ex.body_done:
            # answered before the upload ended: the server reads the rest anyway, and the
            # `with_request` copies (and the recording) can still have it if it stays within
            # what we retain
            if (
                self.ticket is not None or self.recorder is not None
            ) and self.body_state == BodyState.READING:
                self.body_state = BodyState.LATE
                ex.on_body_lost = self._body_lost
            else:
                if self.stream is None:
                    ex.release_body()
                # else the streamed copies keep being fed while the server reads the rest
                self._unkept()
        ex.end_response()
        self._observe(self.status)
        if self.capture is not None:
            self.capture.finish(self.proxy.time() - self.t0)
        if self.rec_capture is not None:
            self.rec_capture.finish(self.proxy.time() - self.t0)
        self._shadow_response_done()

    def _body_lost(self) -> None:
        """The connection closed before the rest of the body came: it never will."""
        if self.stream is not None:
            self.stream.cut()
        if self.body_state == BodyState.LATE:
            self._unkept()
            if self.ticket is not None:
                self.ticket.late_body(None)
            if self.recorder is not None:
                self._record(None)

    def on_upstream_error(self, err: UpstreamError, retryable: bool) -> None:
        ex = self.exchange
        if self.finished:
            return
        if (
            retryable
            and not self.retried
            and not ex.response_started
            # the whole body is at hand to send again (or there is none)
            and self.body_state == BodyState.COMPLETE
            # the request was written to the dead connection and may have been processed:
            # only an idempotent one may be sent again
            and self.request.method in IDEMPOTENT
        ):
            self.retried = True
            self.conn = None
            self.proxy.loop.create_task(self._connect(fresh=True))
            return
        self._fail(err)

    def on_data_end(self) -> None:
        self.exchange.flush()

    def on_upstream_writable(self, writable: bool) -> None:
        if writable:
            self.exchange.resume_body()
        else:
            self.exchange.pause_body()

    # ----- failures and flow control -----
    def _fail(self, err: UpstreamError) -> None:
        if self.finished:
            return
        self.finished = True
        ex = self.exchange
        if self.stream is not None and not ex.body_done:
            self.stream.cut()  # the client's connection closes on the rest of its body
        if self.conn is not None:
            self.conn.abandon()
        if ex.response_started:
            ex.abort()  # never pass a truncated body off as complete
            self._observe(self.status)
            if self.capture is not None:
                self.capture.finish(self.proxy.time() - self.t0, err.kind)
            self._shadow_response_done()
            return
        status = gateway_status(err.kind)
        msg = f"upstream {self.backend.name} ({self.endpoint.label}): {err}\n"
        ex.respond(status, msg.encode())
        self._observe(status)
        if self.capture is not None:
            self.capture.finish(self.proxy.time() - self.t0, err.kind, status)
        self._shadow_response_done()

    def _client_gone(self) -> None:
        if self.stream is not None:
            self.stream.cut()  # the body was cut (copies whose body ended go on)
        if self.capture is not None:
            self.capture.abandon()
        if self.conn is not None:
            self.conn.abandon()
        if not self.finished:
            self.finished = True
            self._observe(499)
            self._shadow_response_done()

    def _client_writable(self, writable: bool) -> None:
        conn = self.conn
        if conn is not None:
            if writable:
                conn.resume_reading()
            else:
                conn.pause_reading()

    def _observe(self, status: int) -> None:
        proxy = self.proxy
        elapsed = proxy.time() - self.t0
        self.status = status
        proxy.metrics.observe_request(self.rt.name, self.backend.name, status, elapsed)
        if proxy.access_log is not None:
            shadows = self.ticket.outcomes if self.ticket is not None else None
            proxy.access_log(
                self.request, self.rt.name, self.backend.name, status, elapsed, shadows
            )
