"""Downstream HTTP/1.1 server: an asyncio Protocol fed by httptools (llhttp).

Shaped like uvicorn's `httptools_impl`, with three differences that matter for a proxy:

* Requests are dispatched to the application one at a time per connection, in order; later
  pipelined requests wait (bounded: reading pauses while one is queued), so answers go out in
  request order without reordering buffers.
* A request is dispatched only once its head has been accepted *and* the bytes that carried it
  parsed cleanly (for chunked bodies: once the first chunk size parsed), so a malformed request
  never reaches a backend. Later chunk errors abort the upstream request mid-body, so a backend
  never sees a complete request that the client did not send.
* Timeouts (header read, keep-alive idle) are checked by one sweep per listener instead of a
  timer per request, so the per-request cost is two float stores.

Whether a head is acceptable and how its body is framed is decided by the pure
`wire.request_head.decide_head`; this module only collects the head from the parser's
callbacks and acts on the verdict. The application receives an `Exchange` and drives it: it
consumes the body as it streams (`set_body_consumer`), and writes the response
(`start_response`, `send_body`, `end_response`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol, cast

import httptools

from shadowlane.wire.headers import serialize_headers
from shadowlane.wire.messages import Headers, Request
from shadowlane.wire.request_head import (
    HEADER_TOO_LARGE,
    Framing,
    Rejection,
    decide_head,
    parser_rejection,
)

__all__ = [
    "DISCARD_LIMIT",
    "App",
    "BadRequest",
    "Exchange",
    "ServerConnection",
    "ServerLimits",
    "ServerState",
]

_STATUS_TEXT = {
    100: b"Continue",
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LINGER_RST = struct.pack("ii", 1, 0)
_BAD_REQUEST: Final = Rejection(400, "bad request")
_HEADER_TIMEOUT: Final = Rejection(408, "request header timeout")

#: an answered request's unread body is read and dropped up to this size, then we close
DISCARD_LIMIT = 4 * 1024 * 1024
_INF = float("inf")


class App(Protocol):
    """What the server hands requests to (the proxy)."""

    def handle(self, exchange: Exchange) -> None: ...


class ServerLimits:
    __slots__ = ("header_timeout", "idle_timeout", "max_header_size")

    def __init__(
        self, max_header_size: int = 65536, header_timeout: float = 10.0, idle_timeout: float = 60.0
    ) -> None:
        self.max_header_size = max_header_size
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout


class BadRequest(Exception):
    """Raised in a parser callback to refuse the message: llhttp stops there, and
    `data_received` answers with the rejection (see `_fail`)."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


class Exchange:
    """One request and its response on a downstream connection.

    Body side: chunks that arrive before the application subscribes are buffered and replayed.
    Response side: the application calls `start_response` once, `send_body` any number of times
    and `end_response` once; framing (Content-Length, chunked, or close-delimited for HTTP/1.0
    clients) is chosen by `start_response`.
    """

    __slots__ = (
        "_body_buffer",
        "_chunked_out",
        "_on_body",
        "_on_body_end",
        "_pending",
        "body_done",
        "body_size",
        "chunked",
        "conn",
        "content_length",
        "expect_continue",
        "head_request",
        "on_abort",
        "on_body_lost",
        "on_writable",
        "request",
        "response_done",
        "response_started",
        "status",
    )

    def __init__(self, conn: ServerConnection, request: Request) -> None:
        self.conn = conn
        self.request = request
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.head_request = request.method == "HEAD"
        self.body_size = 0
        self.body_done = False
        self._body_buffer: list[bytes] | None = None
        self._on_body: Callable[[bytes], None] | None = None
        self._on_body_end: Callable[[], None] | None = None
        self.response_started = False
        self.response_done = False
        self._chunked_out = False
        self._pending = b""
        self.status = 0
        #: called with no argument when the client connection is lost mid-exchange
        self.on_abort: Callable[[], None] | None = None
        #: called with True/False when the client's write buffer fills/drains
        self.on_writable: Callable[[bool], None] | None = None
        #: the application still reads the body after its answer (see `_discard_rest`): called
        #: when that body will never complete (the connection closed first)
        self.on_body_lost: Callable[[], None] | None = None

    # ----- request body -----
    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def set_body_consumer(
        self, on_body: Callable[[bytes], None], on_end: Callable[[], None]
    ) -> None:
        """Subscribe to the body; buffered chunks (and the end, if seen) are replayed first."""
        buffered = self._body_buffer
        self._body_buffer = None
        if buffered:
            for chunk in buffered:
                on_body(chunk)
        if self.body_done:
            on_end()
        else:
            self._on_body = on_body
            self._on_body_end = on_end
        if self.expect_continue and not self.body_done and not self.response_started:
            self.expect_continue = False
            self.conn.write(_CONTINUE)

    def release_body(self) -> None:
        """The application wants no more of the body (its answer is out): the rest is dropped."""
        self._on_body = self._on_body_end = None

    def _body_lost(self) -> None:
        callback = self.on_body_lost
        self.on_body_lost = None
        if callback is not None and not self.body_done:
            callback()

    def pause_body(self) -> None:
        self.conn.pause_reading_for("upstream")

    def resume_body(self) -> None:
        self.conn.resume_reading_for("upstream")

    def _feed_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self._on_body is not None:
            self._on_body(chunk)
        elif self.response_done:
            pass  # answered already: the rest of the body is read and dropped
        elif self._body_buffer is None:
            self._body_buffer = [chunk]
        else:
            self._body_buffer.append(chunk)

    def _end_body(self) -> None:
        self.body_done = True
        end = self._on_body_end
        self._on_body = self._on_body_end = None
        if end is not None:
            end()

    # ----- response -----
    def start_response(
        self,
        status: int,
        reason: bytes,
        headers: Headers,
        content_length: int | None,
        *,
        close: bool = False,
    ) -> None:
        """Write the response head. `content_length` None means the length is unknown."""
        self.start_response_fields(
            status, reason, serialize_headers(headers), content_length, close=close
        )

    def start_response_fields(
        self,
        status: int,
        reason: bytes,
        fields: bytes,
        content_length: int | None,
        *,
        close: bool = False,
    ) -> None:
        """`start_response` with the header fields already serialised (`name: value\r\n`...),
        as the proxy builds them in the same pass that drops hop-by-hop headers."""
        self.response_started = True
        self.status = status
        self.expect_continue = False
        conn = self.conn
        req = self.request
        if close or not req.keep_alive or conn.draining:
            req.keep_alive = False
        no_body = self.head_request or status < 200 or status in (204, 304)
        if content_length is not None or no_body:
            framing = b""
            if content_length is not None and status != 304 and status >= 200 and status != 204:
                framing = b"content-length: " + str(content_length).encode() + b"\r\n"
        elif req.http_version == "1.1":
            framing = b"transfer-encoding: chunked\r\n"
            self._chunked_out = True
        else:
            framing = b""
            req.keep_alive = False  # HTTP/1.0: the body ends when we close
        if req.keep_alive:
            if req.http_version == "1.0":
                framing += b"connection: keep-alive\r\n"
        else:
            framing += b"connection: close\r\n"
        # held until the body, the end, or flush(): one write (one syscall) instead of two
        line = _STATUS_LINES.get((status, reason))
        if line is None:
            line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
            if len(_STATUS_LINES) < 256:  # a handful of (status, reason) pairs repeat
                _STATUS_LINES[(status, reason)] = line
        self._pending = line + fields + framing + b"\r\n"

    def send_body(self, data: bytes) -> None:
        if not data or self.head_request:
            return
        if self._chunked_out:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self._pending:
            data = self._pending + data
            self._pending = b""
        self.conn.write(data)

    def flush(self) -> None:
        """Write a held response head now (the body is not here yet)."""
        if self._pending:
            self.conn.write(self._pending)
            self._pending = b""

    def end_response(self) -> None:
        if self.response_done:
            return
        self.response_done = True
        if self._chunked_out and not self.head_request:
            self.conn.write(self._pending + b"0\r\n\r\n")
            self._pending = b""
        elif self._pending:
            self.conn.write(self._pending)
            self._pending = b""
        # break the exchange <-> application cycle so refcounting frees both now, not the GC
        self.on_abort = self.on_writable = None
        self.conn._exchange_done(self)

    def respond(
        self, status: int, body: bytes, *, close: bool = False, headers: Headers | None = None
    ) -> None:
        """A complete short response generated by the proxy itself (errors, 404)."""
        hdrs: Headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if headers:
            hdrs.extend(headers)
        if not self.body_done:
            close = True  # the unread rest of the body would be parsed as the next request
        self.start_response(
            status, _STATUS_TEXT.get(status, b"Unknown"), hdrs, len(body), close=close
        )
        self.send_body(body)
        self.end_response()

    def abort(self) -> None:
        """Reset the client connection: a truncated response must never look complete."""
        self.response_done = True
        self.on_abort = self.on_writable = None
        self.conn.abort()


class ServerState:
    """Per-listener shared state: the live connections, the timeout sweep, draining."""

    def __init__(self, app: App, limits: ServerLimits, proto: bytes = b"http") -> None:
        self.app = app
        self.limits = limits
        self.proto = proto
        self.connections: set[ServerConnection] = set()
        self.draining = False
        self._sweeper: asyncio.TimerHandle | None = None

    def protocol_factory(self) -> ServerConnection:
        if self._sweeper is None:
            self._schedule_sweep()
        return ServerConnection(self)

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(0.25, self._sweep)

    def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        for conn in list(self.connections):
            if conn.deadline < now:
                conn.on_deadline()
        self._schedule_sweep()

    def start_drain(self) -> None:
        """Stop keep-alive: idle connections close now, busy ones after their response."""
        self.draining = True
        for conn in list(self.connections):
            conn.drain()

    def busy(self) -> bool:
        """Some connection has a request in flight or queued (idle ones do not count: a TLS
        connection may take a while to finish closing and holds no request)."""
        return any(conn.busy for conn in self.connections)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class ServerConnection(asyncio.Protocol):
    """One client connection: parse, validate, dispatch in order, write answers."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.app = state.app
        self.limits = state.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # bound once per connection: a call by name costs a method lookup every time
        self._handle: Callable[[Exchange], None] = state.app.handle
        self._feed: Callable[[bytes], object] = self.parser.feed_data
        self._write: Callable[[bytes], object]  # transport.write, set by connection_made
        self._time: Callable[[], float] = self.loop.time
        self.client_addr = ""
        self.draining = state.draining
        # parsing state of the message being read
        self._url = b""
        self._headers: Headers = []
        self._head_bytes = 0
        self._msg_seq = 0
        self._in_head = False
        self._parsing: Exchange | None = None
        self._ready: list[Exchange] = []
        # dispatch state
        self._active: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        self._paused_for: set[str] = set()
        self._closed = False
        self._error: Rejection | None = None
        #: the answered exchange whose unread body is being read and dropped
        self._discarding: Exchange | None = None
        self.deadline = _INF

    # ----- asyncio callbacks -----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self._write = self.transport.write
        self.state.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client_addr = peer[0] if peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.deadline = self.loop.time() + self.limits.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.state.connections.discard(self)
        discarding = self._discarding
        if discarding is not None:
            self._discarding = None
            discarding._body_lost()
        ex = self._active
        if ex is not None and not ex.response_done and ex.on_abort is not None:
            ex.on_abort()
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        if self._closed or self._error is not None:
            return
        seq = self._msg_seq
        was_in_head = self._in_head
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade:
            # Upgrade is not supported: the request is served as a plain request (Upgrade is a
            # hop-by-hop header and is stripped), then the connection is closed.
            self._ready_close_after_upgrade()
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ or exc.__cause__
            self._fail(cause.rejection if isinstance(cause, BadRequest) else _BAD_REQUEST)
            return
        except httptools.HttpParserError as exc:
            self._fail(parser_rejection(exc))
            return
        if self._in_head and was_in_head and seq == self._msg_seq:
            # The whole segment was head bytes of one unfinished head: bound them here, since
            # llhttp buffers a header until it is complete. (The segment that began the head
            # is not counted: it may also hold the previous message's body.)
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_size:
                self._fail(HEADER_TOO_LARGE)
                return
        if self._ready:
            ready = self._ready
            self._ready = []
            for ex in ready:
                self._enqueue(ex)

    def eof_received(self) -> bool:
        """The client half-closed (`shutdown(SHUT_WR)`): answer what was asked, then close."""
        if self._active is None and not self._queue and not self._ready:
            return False  # nothing to answer: let the transport close
        if self._parsing is not None or self._in_head:
            return False  # a request cut mid-way can never complete: close (aborts upstream)
        self.draining = True
        for ex in (self._active, *self._queue):
            if ex is not None:
                ex.request.keep_alive = False
        return True

    def pause_writing(self) -> None:
        ex = self._active
        if ex is not None and ex.on_writable is not None:
            ex.on_writable(False)

    def resume_writing(self) -> None:
        ex = self._active
        if ex is not None and ex.on_writable is not None:
            ex.on_writable(True)

    # ----- httptools callbacks -----
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._in_head = True
        self._head_bytes = 0
        self._msg_seq += 1
        if self._active is None:
            self.deadline = self._time() + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        version = parser.get_http_version()
        head = decide_head(
            parser.get_method(), self._url, version, self._headers, self.limits.max_header_size
        )
        if isinstance(head, Rejection):
            raise BadRequest(head)
        req = Request(
            head.method,
            head.target,
            version,
            head.headers,
            head.host,
            self.client_addr,
            parser.should_keep_alive(),
        )
        ex = Exchange(self, req)
        chunked = head.framing is Framing.CHUNKED
        ex.content_length = head.content_length
        ex.chunked = chunked
        ex.expect_continue = head.expect_continue
        self._parsing = ex
        if not chunked or head.expect_continue:
            # Chunked bodies wait for their first valid chunk size before dispatch, except
            # when the client waits for 100-continue before sending any.
            self._ready.append(ex)

    def on_chunk_header(self) -> None:
        ex = self._parsing
        if ex is not None and ex.body_size == 0 and not self._dispatched(ex):
            self._ready.append(ex)

    def _dispatched(self, ex: Exchange) -> bool:
        """Already handed on (ready, queued or active): e.g. a 100-continue request."""
        return ex is self._active or ex in self._ready or ex in self._queue

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        if ex is not None:
            ex._feed_body(body)

    def on_message_complete(self) -> None:
        ex = self._parsing
        self._parsing = None
        if ex is None:
            return
        if ex.chunked and not self._dispatched(ex):
            self._ready.append(ex)
        ex._end_body()

    # ----- dispatch -----
    def _enqueue(self, ex: Exchange) -> None:
        if self._active is None:
            self._start(ex)
        else:
            self._queue.append(ex)
            self.pause_reading_for("pipeline")

    def _start(self, ex: Exchange) -> None:
        self._active = ex
        self.deadline = _INF
        if self.draining:
            ex.request.keep_alive = False
        self._handle(ex)

    def _exchange_done(self, ex: Exchange) -> None:
        if ex is not self._active:
            return
        self._active = None
        transport = self.transport
        if self._closed or transport is None:
            return
        if not ex.body_done and ex.request.keep_alive and not self.draining:
            # Answered before the client finished its upload (a backend that did not read it
            # all): read and drop the rest, as nginx does, instead of closing with unread bytes,
            # which makes the client's kernel reset the connection under its answer.
            self._discard_rest(ex)
            return
        if not ex.request.keep_alive or not ex.body_done:
            ex._body_lost()
            transport.close()
            self._closed = True
            return
        self._next()

    def _discard_rest(self, ex: Exchange) -> None:
        budget = DISCARD_LIMIT
        # an application that still wants the rest (the shadow copies of an upload the primary
        # answered early) keeps getting it while we read it anyway
        keep, keep_end = ex._on_body, ex._on_body_end

        def drop(chunk: bytes) -> None:
            nonlocal budget
            budget -= len(chunk)
            if keep is not None:
                keep(chunk)
            if budget < 0:
                self.close()  # too much left to be worth reading

        def end() -> None:
            self._discarding = None
            if keep_end is not None:
                keep_end()
            self._next()

        ex._on_body = drop
        ex._on_body_end = end
        ex._body_buffer = None
        self._discarding = ex
        self._paused_for.discard("upstream")
        self.resume_reading_for("discard")
        self.deadline = self.loop.time() + self.limits.header_timeout

    def _next(self) -> None:
        """The connection is free again: start the next queued request or wait for one."""
        if self._closed:
            return
        if self._queue:
            self._start(self._queue.popleft())
            if not self._queue:
                self.resume_reading_for("pipeline")
            return
        if self._error is not None:
            self._send_error(self._error)
            return
        self.deadline = self._time() + (
            self.limits.header_timeout if self._in_head else self.limits.idle_timeout
        )

    # ----- errors, timeouts, closing -----
    def _fail(self, err: Rejection) -> None:
        """A malformed request: answer after the in-flight ones, then close. Nothing of it was
        dispatched, so no backend sees it; complete requests parsed before it in the same
        bytes are served first, in order."""
        self._error = err
        if self.transport is not None:
            self.transport.pause_reading()
        ready = [ex for ex in self._ready if ex.body_done and ex is not self._parsing]
        self._ready = []
        for ex in ready:
            self._enqueue(ex)
        if self._active is None and not self._queue:
            self._send_error(err)

    def _send_error(self, err: Rejection) -> None:
        body = err.reason.encode() + b"\n"
        text = _STATUS_TEXT.get(err.status, b"Bad Request")
        self.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (err.status, text, len(body), body)
        )
        self.close()

    def _ready_close_after_upgrade(self) -> None:
        for ex in self._ready:
            ex.request.keep_alive = False
        if self._parsing is not None:
            self._parsing.request.keep_alive = False

    def on_deadline(self) -> None:
        if self._active is not None or self._closed:
            return
        if self._in_head:
            self._send_error(_HEADER_TIMEOUT)
        else:
            self.close()

    def drain(self) -> None:
        self.draining = True
        if self._active is None and not self._queue:
            self.close()

    def write(self, data: bytes) -> None:
        if not self._closed and self.transport is not None:
            self._write(data)

    def close(self) -> None:
        if not self._closed and self.transport is not None:
            self._closed = True
            self.transport.close()

    def abort(self) -> None:
        transport = self.transport
        if transport is None or self._closed:
            return
        self._closed = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        transport.abort()

    def pause_reading_for(self, reason: str) -> None:
        if not self._paused_for and self.transport is not None and not self._closed:
            self.transport.pause_reading()
        self._paused_for.add(reason)

    def resume_reading_for(self, reason: str) -> None:
        self._paused_for.discard(reason)
        if (
            not self._paused_for
            and self.transport is not None
            and not self._closed
            and self._error is None
        ):
            self.transport.resume_reading()

    @property
    def busy(self) -> bool:
        return self._active is not None or bool(self._queue) or bool(self._ready)


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}
