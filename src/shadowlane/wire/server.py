"""Downstream HTTP/1.1 server: an asyncio Protocol fed by httptools (llhttp).

Shaped like uvicorn's `httptools_impl`, with three differences that matter for a proxy:

* Requests are dispatched to the application one at a time per connection, in order; later
  pipelined requests wait (bounded: reading pauses while one is queued), so answers go out in
  request order without reordering buffers.
* A request is dispatched only once its head has been accepted *and* the bytes that carried it
  parsed cleanly (for chunked bodies: once the first chunk size parsed), so a malformed request
  never reaches a backend. Later chunk errors abort the upstream request mid-body, so a backend
  never sees a complete request that the client did not send.
* Timeouts (header read, keep-alive idle, minimum body rate) are checked by one sweep per
  listener instead of a timer per request, so the per-request cost is two float stores. The
  same sweep samples the overload manager's resources (`wire.overload`).
* Limits on greedy clients: a connection cap (past it, a new connection is closed at accept),
  a maximum of requests per connection (the last one is answered with `Connection: close`),
  and a minimum body rate (a slow upload gets 408 and is closed). Each is counted through the
  listener's `on_limit` hook, so this module needs no metrics.

* A turn budget for the loop (`READERS_PER_TURN`): past it, a connection that starts reading
  is held (reading paused) until the loop's ready queue has run again. See
  `ServerState.note_turn`.

An upgrade request (llhttp stops at its head) is dispatched with `Exchange.upgrade` set and
reading paused; the application either tunnels it after a `101`, taking the transport over
(`take_over`, see `wire.tunnel`), or serves it as a plain request, after which the connection
closes. Ordinary requests pay nothing for it: the parser raises only for an upgrade.

Whether a head is acceptable and how its body is framed is decided by the pure
`wire.request_head.decide_head`; this module only collects the head from the parser's
callbacks and acts on the verdict. The application receives an `Exchange` (`wire.exchange`) and
drives it: it consumes the body as it streams (`set_body_consumer`), and writes the response
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

from shadowlane.wire.exchange import STATUS_TEXT, Connection, Exchange
from shadowlane.wire.messages import Headers, Request
from shadowlane.wire.overload import OverloadState, read_rss
from shadowlane.wire.parsers import INERT_REQUEST_PARSER
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

_LINGER_RST = struct.pack("ii", 1, 0)
_BAD_REQUEST: Final = Rejection(400, "bad request")
_HEADER_TIMEOUT: Final = Rejection(408, "request header timeout")
_UPGRADE_WITH_BODY: Final = Rejection(400, "an Upgrade request with a body is not supported")
_BODY_TIMEOUT: Final = Rejection(408, "request body too slow")

#: how often the sweep runs (timeouts, body rate, overload sampling)
SWEEP_INTERVAL: Final = 0.25

#: the `limit` label values the listener reports through `on_limit`
LIMIT_CONNECTIONS: Final = "connections"
LIMIT_HEADER_TIMEOUT: Final = "header_timeout"
LIMIT_BODY_RATE: Final = "body_rate"
LIMIT_FDS: Final = "fds"

#: client connections the loop may read from between two runs of its ready queue; past it, a
#: connection that starts reading is held until the queue has run (see `ServerState.note_turn`)
READERS_PER_TURN: Final = 512
#: the `_paused_for` reason of a connection held for the loop's turn
_TURN: Final = "turn"

#: an answered request's unread body is read and dropped up to this size, then we close
DISCARD_LIMIT = 4 * 1024 * 1024
_INF = float("inf")


class App(Protocol):
    """What the server hands requests to (the proxy)."""

    def handle(self, exchange: Exchange) -> None: ...


class ServerLimits:
    """The downstream limits; 0 turns a count or rate limit off. Mutable in place: a reload
    writes new values and every open connection reads them."""

    __slots__ = (
        "body_rate_window",
        "header_timeout",
        "idle_timeout",
        "max_connections",
        "max_fd",
        "max_header_size",
        "max_requests_per_connection",
        "min_body_rate",
    )

    def __init__(
        self,
        max_header_size: int = 65536,
        header_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        *,
        max_connections: int = 0,
        max_requests_per_connection: int = 0,
        min_body_rate: int = 0,
        body_rate_window: float = 10.0,
        max_fd: int = 0,
    ) -> None:
        self.max_header_size = max_header_size
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_requests_per_connection = max_requests_per_connection
        #: bytes per second a request body must average over `body_rate_window`
        self.min_body_rate = min_body_rate
        self.body_rate_window = body_rate_window
        #: a connection accepted on a descriptor this high is closed at once (0: no check):
        #: descriptors are allocated lowest first, so the number says how many are open
        self.max_fd = max_fd


class BadRequest(Exception):
    """Raised in a parser callback to refuse the message: llhttp stops there, and
    `data_received` answers with the rejection (see `_fail`)."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


class ServerState:
    """Per-listener shared state: the live connections, the timeout sweep, draining."""

    def __init__(
        self,
        app: App,
        limits: ServerLimits,
        proto: bytes = b"http",
        *,
        overload: OverloadState | None = None,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.proto = proto
        self.connections: set[ServerConnection] = set()
        self.draining = False
        self._sweeper: asyncio.TimerHandle | None = None
        #: sampled by the sweep; read by the application (the proxy) per request
        self.overload = overload if overload is not None else OverloadState()
        #: called with a LIMIT_* name each time a limit closes a connection or ends a request
        self.on_limit = on_limit
        #: connections closed at accept because `max_connections` were open
        self.refused_connections = 0
        #: connections that read since the loop's ready queue last ran (see `note_turn`)
        self.readers = 0
        #: which run of the queue that is: a connection counts once per turn
        self.turn = 0
        #: connections whose reading waits for that run
        self.held: list[ServerConnection] = []
        #: connections ever held (the `shadowlane_loop_turn_holds` metric)
        self.holds = 0

    def limit_hit(self, limit: str) -> None:
        if self.on_limit is not None:
            self.on_limit(limit)

    def note_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """The first read since the ready queue ran: have the queue report its next run.

        Why a budget at all: libuv, whose loop uvloop is, polls again without running timers or
        `call_soon` callbacks for as long as `epoll_wait` comes back full (1,024 events), up to
        48 times in a row. With more than about a thousand busy sockets (1,000 keep-alive
        clients and their upstream connections) that was 1.5 s of reads and writes with no
        timer, no task and no new connection taken in: a new client's first request, a pool
        connect, a shadow copy's dispatch and every timeout waited that long. Holding the
        connections that read past the budget empties the next polls, libuv ends its turn and
        the queue runs; nginx gets the same by running its timers and posted events after every
        `epoll_wait`. Below the budget (any loop whose polls do not come back full) nothing is
        held, and the cost is two integers per read and one callback per loop turn.

        Why connections and not reads: what fills a poll is ready sockets, and libuv reads a
        ready socket up to 32 times per poll, so a count of reads would count one fast upload
        many times over."""
        loop.call_soon(self._turned)

    def _turned(self) -> None:
        self.readers = 0
        self.turn += 1
        held = self.held
        if held:
            self.held = []
            for conn in held:
                conn.resume_reading_for(_TURN)

    def protocol_factory(self) -> ServerConnection:
        if self._sweeper is None:
            self._schedule_sweep()
        return ServerConnection(self)

    def start_sweeping(self) -> None:
        """Run the sweep from now on, not from the first connection: the overload manager
        samples memory whether or not clients are connected."""
        if self._sweeper is None:
            self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        limits = self.limits
        min_rate = limits.min_body_rate
        window = limits.body_rate_window
        in_flight = 0
        for conn in list(self.connections):
            if conn._active is not None:
                in_flight += 1
            if conn.deadline < now:
                conn.on_deadline()
            elif min_rate:
                conn.check_body_rate(now, min_rate, window)
        overload = self.overload
        overload.evaluate(read_rss() if overload.watches_rss else 0, in_flight)
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


class ServerConnection(Connection):
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
        #: the bytes that followed an upgrade request's head, kept for its tunnel
        self._upgrade_data = b""
        self.deadline = _INF
        #: the loop turn this connection last counted itself in (`ServerState.turn`)
        self._turn = -1
        #: requests this connection may still start; at 0 the last one closes it (-1: no limit)
        self._requests_left = state.limits.max_requests_per_connection or -1
        #: the body-rate window: the exchange it watches, since when, its body size then
        self._rate_ex: Exchange | None = None
        self._rate_since = 0.0
        self._rate_bytes = 0

    # ----- asyncio callbacks -----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self._write = self.transport.write
        state = self.state
        limits = self.limits
        cap = limits.max_connections
        sock = transport.get_extra_info("socket")
        refused = ""
        if cap and len(state.connections) >= cap:
            refused = LIMIT_CONNECTIONS
        elif limits.max_fd and sock is not None and sock.fileno() >= limits.max_fd:
            refused = LIMIT_FDS
        if refused:
            # past the cap: closed at accept, before a byte is read (nginx's worker_connections
            # and Envoy's max_downstream_connection do the same); a reset, not a FIN, so the
            # client does not wait on a half-open connection
            self._closed = True
            state.refused_connections += 1
            state.limit_hit(refused)
            self.abort_transport()
            return
        state.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client_addr = peer[0] if peer else ""
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
        # A request cut mid-body would pin the chunks read before it was answered for as long
        # as anything holds the exchange: after a burst of uploads refused 503 by the overload
        # manager, 58 MiB stayed allocated and RSS stayed past the watermark, so every later
        # request was refused too.
        cut = self._parsing
        if cut is not None:
            self._parsing = None
            cut._body_buffer = None
        self._active = None
        self._ready = []
        self._queue.clear()
        # the parser keeps this protocol's bound methods: without it, reference counting frees
        # the connection, not a collection of the old generation (see wire/parsers.py)
        self.parser = INERT_REQUEST_PARSER
        self._feed = INERT_REQUEST_PARSER.feed_data

    def data_received(self, data: bytes) -> None:
        if self._closed or self._error is not None:
            return
        state = self.state
        if self._turn != state.turn:
            self._turn = state.turn
            readers = state.readers
            state.readers = readers + 1
            if readers == 0:
                state.note_turn(self.loop)
            elif readers >= READERS_PER_TURN:
                # what was read is served; the next read waits for the loop's turn
                self.pause_reading_for(_TURN)
                state.held.append(self)
                state.holds += 1
        seq = self._msg_seq
        was_in_head = self._in_head
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            # the bytes after this head are another protocol's (or a body llhttp leaves unread)
            if self._upgrade_requested(data, int(exc.args[0]) if exc.args else len(data)):
                return
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
        cut = self._parsing
        if cut is not None and cut is self._active:
            return False  # the request being served was cut mid-body: close (aborts upstream)
        if cut is not None:
            # cut before it started (queued behind another): it never reaches a backend
            self._parsing = None
            if cut in self._queue:
                self._queue.remove(cut)
            if cut in self._ready:
                self._ready.remove(cut)
        # a head cut mid-way is dropped the same way; what was asked in full is answered
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
            parser.should_keep_alive() and not head.close,
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
        self._requests_left -= 1
        if self.draining or self._requests_left == 0:
            ex.request.keep_alive = False  # the last one: answered with `Connection: close`
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
        text = STATUS_TEXT.get(err.status, b"Bad Request")
        self.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (err.status, text, len(body), body)
        )
        self.close()

    def _upgrade_requested(self, data: bytes, offset: int) -> bool:
        """llhttp stopped after an upgrade request's head. The request (the last one parsed)
        is dispatched with `Exchange.upgrade` set: the application tunnels it after a `101`
        (`take_over`), or serves it as a plain request, after which the connection closes, as
        the bytes that follow are not HTTP/1.1. Reading stops here until one or the other;
        what came after the head in this segment is kept for the tunnel. True when the request
        was refused instead: llhttp does not read an upgrade request's body, so one that
        announces a body cannot be forwarded as sent."""
        self.pause_reading_for("upgrade")
        ex = self._ready[-1] if self._ready else None
        if ex is None or ex.has_body:
            if ex is not None:
                self._ready.pop()
            self._fail(_UPGRADE_WITH_BODY)
            return True
        # requests pipelined before it are served as usual; the connection ends with it
        ex.request.keep_alive = False
        value = b""
        for name, v in ex.request.headers:
            if name == b"upgrade":
                value = v.strip().lower()
                break
        ex.upgrade = value or b"?"
        self._upgrade_data = data[offset:]
        return False

    def take_over(self) -> tuple[asyncio.Transport, bytes] | None:
        transport = self.transport
        if transport is None or self._closed:
            return None
        self._closed = True  # nothing of this protocol writes, closes or times out any more
        self._active = None
        self._queue.clear()
        self.deadline = _INF
        self.state.connections.discard(self)
        early, self._upgrade_data = self._upgrade_data, b""
        return transport, early

    def on_deadline(self) -> None:
        if self._active is not None or self._closed:
            return
        if self._in_head:
            self.state.limit_hit(LIMIT_HEADER_TIMEOUT)
            self._send_error(_HEADER_TIMEOUT)
        else:
            self.close()

    def check_body_rate(self, now: float, min_rate: int, window: float) -> None:
        """The sweep's body-rate check: a body that arrives slower than `min_rate` bytes/s
        over a whole window gets 408 and the connection is closed (nginx's
        client_body_timeout, as a rate). A body we stopped reading (paused for the backend or
        the pipeline) is not the client's fault: its window starts again when reading does."""
        ex = self._parsing
        if ex is None or self._paused_for or self._closed or ex.body_done or ex.expect_continue:
            # (a client that asked for 100-continue sends nothing until we say so)
            self._rate_ex = None
            return
        if self._rate_ex is not ex:
            self._rate_ex = ex
            self._rate_since = now
            self._rate_bytes = ex.body_size
            return
        elapsed = now - self._rate_since
        if elapsed < window:
            return
        if ex.body_size - self._rate_bytes >= min_rate * elapsed:
            self._rate_since = now  # fast enough: a new window
            self._rate_bytes = ex.body_size
            return
        self.state.limit_hit(LIMIT_BODY_RATE)
        self._rate_ex = None
        if ex.response_started or self._discarding is ex:
            # an answer is (partly) out: a 408 cannot follow it; end the connection
            if ex.response_done:
                self.close()
            else:
                self.abort()
            return
        # the primary was sent the partial body: closing makes connection_lost abort it, so
        # the backend never sees a complete request the client did not send
        self._send_error(_BODY_TIMEOUT)

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
        self.abort_transport()

    def abort_transport(self) -> None:
        """Close with a reset (SO_LINGER 0), so the peer sees an error, not a clean end."""
        transport = self.transport
        if transport is None:
            return
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
