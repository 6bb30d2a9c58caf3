"""The primary path: match a route, pick the backend, forward, stream the answer back.

One `ProxyCall` per request carries it from the downstream `Exchange` to a pooled upstream
connection and back, as callbacks (it is the upstream connection's `ResponseSink`). The shadow
dispatcher is told about the request twice, never awaited: when the request body is complete
(`send: with_request` copies go then) and when the primary answer ended (`after_response`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, assert_never

from shadowlane.routing import Route, RouteTable
from shadowlane.wire.headers import (
    new_request_id,
    response_fields,
    serialize_headers,
    upstream_request_headers,
)
from shadowlane.wire.messages import Headers, Request
from shadowlane.wire.server import Exchange
from shadowlane.wire.upstream import (
    BackendPool,
    EndpointPool,
    ResponseSink,
    UpstreamConnection,
    UpstreamError,
    UpstreamErrorKind,
)

if TYPE_CHECKING:
    from shadowlane.metrics import Metrics
    from shadowlane.shadow.dispatcher import RouteShadows, ShadowDispatcher
    from shadowlane.shadow.join import PrimaryCapture

#: methods safe to resend after a stale keep-alive connection died under them (RFC 9110 9.2.2)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: request bodies up to this size are kept so a stale-connection retry can resend them
RETRY_BODY_LIMIT = 64 * 1024

#: (request, route, backend, status, seconds, shadow outcomes) -> None
AccessLog = Callable[[Request, str, str, int, float, "dict[str, str] | None"], None]


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
    """What the proxy precomputes per route: limits and the shadow plan."""

    __slots__ = ("max_body", "name", "retain_limit", "route", "shadows")

    def __init__(self, route: Route, max_body: int, shadows: RouteShadows | None) -> None:
        self.route = route
        self.name = route.name
        self.max_body = max_body
        self.shadows = shadows
        self.retain_limit = max(RETRY_BODY_LIMIT, shadows.max_body if shadows else 0)


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
    ) -> None:
        self.routes = routes
        self.runtimes = runtimes
        self.backends = backends
        self.metrics = metrics
        self.shadow = shadow
        self.access_log = access_log
        self.proto = proto
        self.loop = asyncio.get_running_loop()
        #: bound once: `loop.time()` by name costs a method lookup per call
        self.time: Callable[[], float] = self.loop.time

    def handle(self, exchange: Exchange) -> None:
        req = exchange.request
        t0 = self.time()
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
        ProxyCall(self, exchange, rt, backend, t0).start()

    def _answered(self, req: Request, route: str, status: int, t0: float) -> None:
        """Account for an answer the proxy gave itself, before any backend was chosen."""
        elapsed = self.time() - t0
        self.metrics.observe_request(route, "", status, elapsed)
        if self.access_log is not None:
            req.request_id = req.header("x-request-id") or new_request_id().decode()
            self.access_log(req, route, "", status, elapsed, None)


class ProxyCall(ResponseSink):
    """One request on the primary path; the upstream connection's ResponseSink."""

    __slots__ = (
        "backend",
        "body",
        "body_size_seen",
        "capture",
        "client_gone",
        "conn",
        "endpoint",
        "exchange",
        "finished",
        "head",
        "late_body",
        "proxy",
        "request",
        "request_id",
        "retained",
        "retried",
        "rt",
        "shadow",
        "shadow_state",
        "status",
        "t0",
        "upstream_headers",
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
        self.retained: list[bytes] | None = [] if exchange.has_body else None
        self.body: bytes | None = None if exchange.has_body else b""
        self.body_size_seen = 0
        #: answered before the upload ended, the rest is still read for the shadow copies
        self.late_body = False
        self.retried = False
        self.client_gone = False
        self.finished = False
        self.status = 0
        self.shadow_state: object = None
        #: the dispatcher this request started with (a reload may swap the proxy's)
        self.shadow = proxy.shadow
        #: the primary's answer as it streams by, when a compared shadow needs it
        self.capture: PrimaryCapture | None = None
        req = self.request
        headers, rid = upstream_request_headers(
            req.headers, req.client_addr.encode(), proxy.proto, self.endpoint.authority
        )
        self.request_id = rid
        req.request_id = rid.decode("latin-1")
        #: the forwarded headers, kept only when shadow copies will be built from them
        self.upstream_headers: Headers | None = headers if rt.shadows is not None else None
        framing = b"transfer-encoding: chunked\r\n" if exchange.chunked else b""
        self.head = (
            req.method.encode() + b" " + req.target + b" HTTP/1.1\r\n"
            + serialize_headers(headers) + framing + b"\r\n"
        )  # fmt: skip

    # ----- request side -----
    def start(self) -> None:
        ex = self.exchange
        ex.on_abort = self._client_gone
        ex.on_writable = self._client_writable
        shadow = self.shadow
        if shadow is not None and self.rt.shadows is not None:
            self.shadow_state = shadow.begin(self)
            if self.shadow_state is not None and not ex.has_body:
                # nothing to wait for: the copies go now, not after the primary connects
                shadow.request_done(self)
        conn = self.endpoint.get_idle()
        if conn is not None:
            self._send(conn)
        else:
            if ex.has_body:
                ex.pause_body()  # bounded: nothing is buffered while we connect
            self.proxy.loop.create_task(self._connect(fresh=False))

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
        if self.client_gone or self.finished:
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
            # resend the retained body of a retried request (only retried when it was whole)
            for chunk in self.retained or ():
                self._write_chunk(conn, chunk)
            self._finish_body(conn)
        else:
            ex.set_body_consumer(self._on_body, self._on_body_end)

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
            self.finished = True
            if not ex.response_started:
                ex.respond(413, b"request body too large\n", close=True)
            else:
                ex.abort()
            self._observe(413)
            return
        self._retain(chunk)
        conn = self.conn
        if conn is not None:
            self._write_chunk(conn, chunk)

    def _retain(self, chunk: bytes) -> None:
        """Keep the body for a retry and the shadow copies, while it is within retain_limit."""
        retained = self.retained
        if retained is not None:
            retained.append(chunk)
            if self.body_size_seen > self.rt.retain_limit:
                self.retained = None

    def _write_chunk(self, conn: UpstreamConnection, chunk: bytes) -> None:
        if self.exchange.chunked:
            conn.write_body(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            conn.write_body(chunk)

    def _on_body_end(self) -> None:
        if self.finished and not self.late_body:
            return
        if self.retained is not None:
            self.body = b"".join(self.retained)
            self.retained = [self.body]
        if self.finished:  # answered early: the copies that waited for the body go now
            self.shadow.late_body(self)  # type: ignore[union-attr]
            return
        conn = self.conn
        if conn is not None:
            self._finish_body(conn)

    def _finish_body(self, conn: UpstreamConnection) -> None:
        if self.exchange.chunked:
            conn.write_body(b"0\r\n\r\n")
        conn.end_request()
        self._request_complete()

    def _request_complete(self) -> None:
        if self.shadow_state is not None:
            self.shadow.request_done(self)  # type: ignore[union-attr]  # once per request

    # ----- response side (ResponseSink) -----
    def on_response_head(
        self, status: int, reason: bytes, headers: Headers, content_length: int | None
    ) -> None:
        if self.client_gone or self.finished:
            return
        self.status = status
        self.exchange.start_response_fields(
            status, reason, response_fields(headers), content_length
        )
        if self.capture is not None:
            self.capture.head(status, headers)

    def on_response_body(self, data: bytes) -> None:
        if not self.client_gone and not self.finished:
            self.exchange.send_body(data)
            if self.capture is not None:
                self.capture.body(data)

    def on_response_end(self) -> None:
        if self.client_gone or self.finished:
            return
        self.finished = True
        ex = self.exchange
        if ex.has_body and not ex.body_done:
            # answered before the upload ended: the server reads the rest anyway, and the
            # `with_request` copies can still have it if it stays within what we retain
            if self.shadow_state is not None and self.retained is not None:
                self.late_body = True
                ex.on_body_lost = self._body_lost
            else:
                ex.release_body()
        ex.end_response()
        self._observe(self.status)
        if self.capture is not None:
            self.capture.finish(self.proxy.time() - self.t0)
        if self.shadow_state is not None:
            self.shadow.response_done(self)  # type: ignore[union-attr]

    def _body_lost(self) -> None:
        """The connection closed before the rest of the body came: it never will."""
        self.retained = None
        self.shadow.late_body(self)  # type: ignore[union-attr]

    def body_may_follow(self) -> bool:
        """The primary answered early and the rest of the body may still arrive."""
        return self.late_body and self.retained is not None

    def on_upstream_error(self, err: UpstreamError, retryable: bool) -> None:
        ex = self.exchange
        if self.client_gone or self.finished:
            return
        if (
            retryable
            and not self.retried
            and not ex.response_started
            and (not ex.has_body or (ex.body_done and self.retained is not None))
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
        if self.finished or self.client_gone:
            return
        self.finished = True
        ex = self.exchange
        if self.conn is not None:
            self.conn.abandon()
        if ex.response_started:
            ex.abort()  # never pass a truncated body off as complete
            self._observe(self.status)
            if self.capture is not None:
                self.capture.finish(self.proxy.time() - self.t0, err.kind)
            if self.shadow_state is not None:
                self.shadow.response_done(self)  # type: ignore[union-attr]
            return
        status = gateway_status(err.kind)
        msg = f"upstream {self.backend.name} ({self.endpoint.label}): {err}\n"
        ex.respond(status, msg.encode())
        self._observe(status)
        if self.capture is not None:
            self.capture.finish(self.proxy.time() - self.t0, err.kind, status)
        if self.shadow_state is not None:
            self.shadow.response_done(self)  # type: ignore[union-attr]

    def _client_gone(self) -> None:
        self.client_gone = True
        if self.capture is not None:
            self.capture.abandon()
        if self.conn is not None:
            self.conn.abandon()
        if not self.finished:
            self.finished = True
            self._observe(499)
            if self.shadow_state is not None:
                self.shadow.response_done(self)  # type: ignore[union-attr]

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
            shadows = self.shadow.outcomes(self) if self.shadow is not None else None
            proxy.access_log(
                self.request, self.rt.name, self.backend.name, status, elapsed, shadows
            )
