"""Upstream HTTP/1.1 client: connection -> endpoint pool -> backend pool (httpcore's layering).

The response streams through callbacks (`ResponseSink`) straight from `data_received` to the
consumer: the proxy writes each piece to the client as it arrives, a shadow collects it. No task
or future per request on the fast path (an idle pooled connection is taken synchronously); only
opening a new connection is a coroutine.

A connection's life is `ConnState`: CONNECTING -> NEW -> BUSY <-> IDLE, and CLOSED from any of
them (h11's and httpcore's explicit states). It goes back to the pool (IDLE) only when its
response ended cleanly, the server allowed keep-alive, and the whole request was written;
anything else closes it, so a pooled connection never carries leftovers. Within BUSY, the
answer being read has its own phase (`ReadPhase`), orthogonal to whether the request is all
written.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, Literal, cast

import httptools

from shadowlane.wire.messages import Headers
from shadowlane.wire.parsers import INERT_RESPONSE_PARSER


class ConnState:
    """An upstream connection's states. Final ints rather than an Enum: compiled, a check is a
    C comparison of two constants, and the pool checks one per request.

    CONNECTING: the TCP (and TLS) handshake is under way; counted against `max_connections`.
    NEW: connected, never carried a request, held by whoever asked for it (not in the pool).
    BUSY: carrying one exchange. IDLE: kept alive in the pool, ready for the next one.
    CLOSED: for good; counted out of the pool exactly once, however it got here.
    """

    CONNECTING: Final = 0
    NEW: Final = 1
    BUSY: Final = 2
    IDLE: Final = 3
    CLOSED: Final = 4
    NAMES: Final = ("connecting", "new", "busy", "idle", "closed")


class ReadPhase:
    """How far the answer to the current exchange has come (meaningful while BUSY).

    WAITING: no byte yet, so a reused connection that closes now went stale under the request
    (the one case a retry is safe). HEAD: bytes, but no final head (a 1xx, or a head in
    pieces). BODY: the head was handed to the sink and the body streams. DONE: it ended.
    """

    WAITING: Final = 0
    HEAD: Final = 1
    BODY: Final = 2
    DONE: Final = 3


#: methods safe to resend after a stale keep-alive connection died under them (RFC 9110 9.2.2):
#: what the proxy, the shadow lanes and replay retry on a `retryable` error
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

#: how long a pooled connection may sit idle; below the usual backend keep-alive timeouts
#: (nginx 75 s, Node 5 s is the outlier; a stale one is retried when that is safe)
POOL_IDLE_TIMEOUT = 50.0
#: how often the connections kept past `max_idle` are halved (the older half closed). Closing
#: them at once made a busy loop, which releases many connections in one iteration and takes
#: them again in the next, reopen most of them per request; closing them a second after a burst
#: made the next burst reopen them all, and in Python a connect is most of what a new client's
#: first request costs (a burst of 1,000 new clients took twice as long). Halving lets a burst's
#: connections serve the next burst and fade out over a few periods, down to `max_idle`, which
#: the idle timeout alone closes. HAProxy's `pool-purge-delay` (5 s by default) does the same.
POOL_PURGE_DELAY = 5.0
#: ... and for a shadow lane's pool, whose copies past `max_idle` should pay a connect: that
#: paces a lane's ramp-up while the primary takes in a burst of new clients. With the shadow's
#: surplus kept warm for 5 s, the copies of a new burst all started at once, and the primary's
#: p99 over 1,000 new connections went from 171 to 203 ms (8 interleaved runs each)
SHADOW_POOL_PURGE_DELAY = 1.0


#: Why an upstream exchange failed, a closed set so that mypy checks every comparison with it
#: (the proxy maps each to 502, 503 or 504). Each is raised here:
#: - refused: the connect failed with an OSError (refused, unreachable, name not resolved);
#: - timeout: the connect took longer than `connect_timeout`, or a busy connection heard no
#:   byte for the exchange's `timeout`;
#: - tls: the TLS handshake failed;
#: - overflow: all `max_connections` stayed busy for `connect_timeout`;
#: - reset: the connection closed before the response completed;
#: - protocol: the answer was not HTTP/1.1 that httptools could parse.
UpstreamErrorKind = Literal["refused", "timeout", "tls", "overflow", "reset", "protocol"]


class UpstreamError(Exception):
    """Why an upstream exchange failed; `kind` is one of UpstreamErrorKind."""

    def __init__(self, kind: UpstreamErrorKind, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


async def connect(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    endpoint: EndpointPool,
) -> None:
    """Open one connection to `endpoint` (TLS when it has a context) for the protocol that
    `factory` makes, within its `connect_timeout`; a failure is the UpstreamError the proxy maps
    (timeout, tls, refused). One place for it because three protocols connect the same way:
    the HTTP/1.1 pool, the HTTP/2 pool and the upgrade handshake, and their errors must agree.
    The caller closes its own half on any exception (a cancellation passes through as it is).
    """
    try:
        async with asyncio.timeout(endpoint.connect_timeout):
            await loop.create_connection(
                factory,
                endpoint.host,
                endpoint.port,
                ssl=endpoint.ssl_context,
                server_hostname=endpoint.server_hostname if endpoint.ssl_context else None,
            )
    except TimeoutError:  # before OSError, of which it is a kind
        raise UpstreamError(
            "timeout", f"connect timed out after {endpoint.connect_timeout:g}s"
        ) from None
    except ssl.SSLError as exc:  # before OSError, of which it is a kind
        raise UpstreamError("tls", str(exc)) from None
    except OSError as exc:
        raise UpstreamError("refused", exc.strerror or str(exc)) from None


class ResponseSink:
    """Receives one upstream response, piece by piece (the proxy's call, a shadow copy).

    A base class rather than a typing.Protocol: compiled, a call through a base class is a
    direct C call, a call through a Protocol looks the method up by name (several per request).
    """

    __slots__ = ()

    def on_response_head(
        self, status: int, reason: bytes, headers: Headers, content_length: int | None
    ) -> None:
        raise NotImplementedError

    def on_response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_response_end(self) -> None:
        raise NotImplementedError

    def on_response_trailers(self, trailers: Headers) -> None:
        """Trailing fields (HTTP/2 trailing HEADERS: gRPC's grpc-status), before the end."""

    def on_upstream_error(self, err: UpstreamError, retryable: bool) -> None:
        """`retryable`: the connection was reused and no response byte came back (stale)."""
        raise NotImplementedError

    def on_upstream_writable(self, writable: bool) -> None:
        """Flow control: the upstream's send buffer is full (False) or drained (True)."""

    def on_data_end(self) -> None:
        """End of one read from the upstream: a chance to flush coalesced writes."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to one endpoint, carrying one exchange at a time.

    Made CONNECTING, and counted against the pool's `max_connections` from then until CLOSED
    (so a handshake in progress holds a slot); `open()` connects it.
    """

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.state = ConnState.CONNECTING
        pool.open += 1
        #: exchanges started on this connection: from the second on, it may have gone stale
        self.exchanges = 0
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        # bound once per connection: a call by name costs a method lookup every time
        self._feed: Callable[[bytes], object] = self._parser.feed_data
        self._write: Callable[[bytes], object]  # transport.write, set by connection_made
        self._time: Callable[[], float] = self.loop.time
        self._sink: ResponseSink | None = None
        self._head_request = False
        self._status = 0
        self._reason = b""
        self._headers: Headers = []
        self._phase = ReadPhase.WAITING
        #: the answer's body is delimited by the connection closing (no length, not chunked)
        self._until_close = False
        #: the whole request (head and body) has been written
        self._request_done = False
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0

    @property
    def state_name(self) -> str:
        return ConnState.NAMES[self.state]

    async def open(self) -> None:
        """CONNECTING -> NEW; or CLOSED, raising UpstreamError (or the cancellation that
        ended the connect: whoever gave up on it, the slot and the socket go with it)."""
        try:
            await connect(self.loop, lambda: self, self.pool)
        except BaseException:
            self.close()
            self._drop_parser()
            raise

    def _drop_parser(self) -> None:
        """Once nothing more is read: the parser keeps this connection's bound methods, so
        without it reference counting frees the connection, not a collection of the old
        generation (see wire/parsers.py)."""
        self._parser = INERT_RESPONSE_PARSER
        self._feed = INERT_RESPONSE_PARSER.feed_data

    # ----- asyncio callbacks -----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self._write = self.transport.write
        if self.state == ConnState.CONNECTING:
            self.state = ConnState.NEW

    def connection_lost(self, exc: Exception | None) -> None:
        prev = self.state
        self._to_closed()
        self._drop_parser()
        sink = self._sink
        if prev != ConnState.BUSY or sink is None:
            return
        self._sink = None
        phase = self._phase
        if phase == ReadPhase.BODY and self._until_close and exc is None:
            # a close-delimited body ends with the connection (httptools has no feed_eof)
            self._phase = ReadPhase.DONE
            sink.on_response_end()
            return
        if phase == ReadPhase.DONE:
            return
        retryable = self.exchanges > 1 and phase == ReadPhase.WAITING
        sink.on_upstream_error(
            UpstreamError("reset", "connection closed before the response completed"), retryable
        )

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._time()
        if self.state != ConnState.BUSY:
            # bytes with no request outstanding: the connection cannot be trusted any more
            self.close()
            return
        if self._phase == ReadPhase.WAITING:
            self._phase = ReadPhase.HEAD
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade:
            # after a `101` the bytes are another protocol's: only a shadow's handshake copy
            # gets one here (its answer ended with the head), and the connection is done
            sink = self._sink
            self._sink = None
            self.close()
            if sink is not None and self._phase != ReadPhase.DONE:
                sink.on_upstream_error(UpstreamError("protocol", "unexpected upgrade"), False)
            return
        except httptools.HttpParserError as exc:
            sink = self._sink
            self._sink = None
            self.close()
            if sink is not None and self._phase != ReadPhase.DONE:
                sink.on_upstream_error(UpstreamError("protocol", str(exc)), False)
            return
        sink = self._sink
        if sink is not None:
            sink.on_data_end()

    def pause_writing(self) -> None:
        if self._sink is not None:
            self._sink.on_upstream_writable(False)

    def resume_writing(self) -> None:
        if self._sink is not None:
            self._sink.on_upstream_writable(True)

    # ----- httptools callbacks -----
    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                self._switched()
                return
            # 1xx interim answers (we never forward Expect) are skipped
            self._headers = []
            self._reason = b""
            return
        self._status = status
        self._phase = ReadPhase.BODY
        content_length: int | None = None
        chunked = False
        for name, value in self._headers:
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        no_body = self._head_request or status in (204, 304)
        self._until_close = not no_body and not chunked and content_length is None
        sink = self._sink
        if sink is not None:
            sink.on_response_head(status, self._reason or b"OK", self._headers, content_length)
        if self._head_request:
            self._finish_response()

    def _switched(self) -> None:
        """`101 Switching Protocols` (only a shadow's handshake copy asks for one): a final
        answer without a body, after which the connection speaks another protocol, so it is
        never reused (`_until_close` makes `_finish_response` close it)."""
        self._status = 101
        self._phase = ReadPhase.BODY
        self._until_close = True
        sink = self._sink
        if sink is not None:
            sink.on_response_head(101, self._reason or b"Switching Protocols", self._headers, None)

    def on_body(self, body: bytes) -> None:
        if self._sink is not None and self._phase != ReadPhase.DONE:
            self._sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._phase == ReadPhase.BODY:
            self._finish_response()

    # ----- used by the pool's clients -----
    def send_request(
        self, head: bytes, sink: ResponseSink, timeout: float, *, head_request: bool = False
    ) -> None:
        """Write a request head (and maybe a body) and stream the answer into `sink`."""
        assert self.transport is not None
        if self.state == ConnState.CLOSED:
            # the peer closed it between the handshake (or the hand-over from the pool) and
            # now, before our task ran: nothing was written, so say so (from the loop, after
            # the caller's own writes, which a closed connection ignores) and let the sink
            # retry; writing would raise on the closed transport
            self._phase = ReadPhase.WAITING
            self._request_done = False
            self.loop.call_soon(
                sink.on_upstream_error,
                UpstreamError("reset", "connection closed before the request was sent"),
                True,
            )
            return
        self.state = ConnState.BUSY
        self.exchanges += 1
        self._sink = sink
        self._head_request = head_request
        self._status = 0
        self._reason = b""
        self._headers = []
        self._phase = ReadPhase.WAITING
        self._until_close = self._request_done = False
        self._timeout = timeout
        self._last_activity = self._time()
        if self._timer is None:
            # one timer per connection, re-armed from the last activity when it fires, rather
            # than one armed and cancelled per request
            self._timer = self.loop.call_later(timeout, self._on_timer)
        self._write(head)

    def write_body(self, data: bytes) -> None:
        if self.state == ConnState.BUSY and self.transport is not None:
            self._last_activity = self._time()
            self._write(data)

    def write_parts(self, parts: list[bytes]) -> None:
        """A body read whole, as the chunks it came in (`Body.parts`): one writev, so the
        transport holds the chunks themselves, not a joined copy of them."""
        transport = self.transport
        if self.state == ConnState.BUSY and transport is not None:
            self._last_activity = self._time()
            transport.writelines(parts)

    def write_chunk(self, data: bytes) -> None:
        """One piece of a body of unknown length (chunked on HTTP/1.1; a DATA frame on
        HTTP/2, whose framing needs no chunks)."""
        self.write_body(b"%x\r\n%s\r\n" % (len(data), data))

    def write_chunk_parts(self, data: bytes) -> None:
        """`write_chunk` without copying `data`: the size line, `data` itself and the CRLF
        go to the transport as three pieces (one writev), so a streamed shadow copy holds
        the very bytes object the primary was written, not a framed copy of it."""
        transport = self.transport
        if self.state == ConnState.BUSY and transport is not None:
            self._last_activity = self._time()
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))

    def write_last_chunk(self) -> None:
        """The end of a body sent with `write_chunk`."""
        self.write_body(b"0\r\n\r\n")

    def end_request(self) -> None:
        """The whole request (head and body) has been written."""
        self._request_done = True
        if self._phase == ReadPhase.DONE:
            self._release()

    def pause_reading(self) -> None:
        """Backpressure from the client being answered: only while its answer is in flight.

        A pause asked for once the connection is back in the pool (the client's buffer filled
        on the answer's last bytes) would stall whichever request uses the connection next.
        """
        if (
            self.transport is not None
            and self.state == ConnState.BUSY
            and self._phase != ReadPhase.DONE
        ):
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.state != ConnState.CLOSED:
            self.transport.resume_reading()

    def abandon(self) -> None:
        """The consumer is gone (client left): drop the connection, nothing more is reported."""
        self._sink = None
        self.close()

    def reset(self) -> None:
        """Like `abandon`, but what is still buffered is dropped rather than sent first (a
        streamed shadow copy given up because the target fell behind: flushing its buffer
        would keep those bytes pinned until the slow target took them)."""
        self._sink = None
        transport = self.transport
        if self._to_closed() and transport is not None:
            transport.abort()

    def write_buffered(self) -> int:
        """Bytes written but not yet taken by the kernel (the transport's write buffer)."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def close(self) -> None:
        if self._to_closed() and self.transport is not None:
            self.transport.close()

    # ----- internals -----
    def _to_closed(self) -> bool:
        """The one way into CLOSED, whichever side ends the connection (and both may):
        the pool counts each connection out once. False when it was closed already."""
        self._cancel_timer()
        if self.state == ConnState.CLOSED:
            return False
        self.state = ConnState.CLOSED
        self.pool._on_closed(self)
        return True

    def _finish_response(self) -> None:
        self._phase = ReadPhase.DONE
        keep_alive = self._parser.should_keep_alive() and not self._until_close
        if self._head_request:
            # the parser still expects the body the HEAD answer announced; the next answer on
            # this connection needs a fresh one (swapped before the next request can be sent)
            self._parser = httptools.HttpResponseParser(self)
            self._feed = self._parser.feed_data  # bound to the new parser
        sink = self._sink
        if not keep_alive:
            self._sink = None
            self.close()
        elif self._request_done:
            self._sink = None
            self._release()
        else:
            # answered before the request body was all sent: the rest would be read as the
            # next request by the server, so this connection is finished
            self._sink = None
            self.close()
        if sink is not None:
            sink.on_response_end()

    def _release(self) -> None:
        if self.state == ConnState.BUSY:
            transport = self.transport
            if transport is not None and transport.get_write_buffer_size():
                # answered before it took the whole request (an early answer to an upload):
                # what is still buffered would stay pinned, unseen by any lane's byte cap,
                # until the server reads it, so the connection goes and the bytes with it
                self._sink = None
                if self._to_closed():
                    transport.abort()  # not close(): that would first send what is buffered
                return
            self.state = ConnState.IDLE
            self._sink = None
            # the last bytes of the answer may have paused reading (the client was slow to
            # take them) and the pause belongs to that client: an idle connection must read,
            # to see the server close it and to hear the next request's answer
            if self.transport is not None:
                self.transport.resume_reading()
            self.pool._release(self)

    def _on_timer(self) -> None:
        self._timer = None
        if self.state != ConnState.BUSY or self._phase == ReadPhase.DONE:
            return  # idle in the pool: the next request arms a new one
        idle = self.loop.time() - self._last_activity
        if idle < self._timeout:
            self._timer = self.loop.call_later(self._timeout - idle, self._on_timer)
            return
        sink = self._sink
        self._sink = None
        self.close()
        if sink is not None and self._phase != ReadPhase.DONE:
            sink.on_upstream_error(
                UpstreamError("timeout", f"no answer in {self._timeout:g}s"), False
            )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class EndpointPool:
    """Keep-alive connections to one endpoint: at most `max_connections` open, `max_idle` kept.

    Connections released past `max_idle` (a burst's) are halved every `purge_delay`, the
    least recently used first, so a burst's connections serve its next requests and the next
    burst's instead of being reopened.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        max_connections: int,
        max_idle: int,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        purge_delay: float = POOL_PURGE_DELAY,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.purge_delay = purge_delay
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.loop = asyncio.get_running_loop()
        #: oldest release first: taken from the right (warmest), trimmed from the left
        self.idle: deque[UpstreamConnection] = deque()
        #: connections from CONNECTING until CLOSED: what `max_connections` bounds
        self.open = 0
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._trimmer: asyncio.TimerHandle | None = None
        self._closed = False
        host_part = f"[{host}]" if ":" in host else host
        #: host:port as bytes, the Host for requests that came without one
        self.authority = f"{host_part}:{port}".encode()

    @property
    def label(self) -> str:
        return self.authority.decode()

    def get_idle(self) -> UpstreamConnection | None:
        """An idle live connection, most recently used first (warmest), or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if (
                conn.state == ConnState.IDLE
                and conn.transport is not None
                and not conn.transport.is_closing()
            ):
                return conn
            conn.close()
        return None

    async def acquire(self) -> UpstreamConnection:
        """An idle connection, a new one, or (at the limit) the next one released."""
        conn = self.get_idle()
        if conn is not None:
            return conn
        if self.open >= self.max_connections:
            fut: asyncio.Future[UpstreamConnection | None] = self.loop.create_future()
            self._waiters.append(fut)
            try:
                got = await asyncio.wait_for(fut, self.connect_timeout)
            except TimeoutError:
                raise UpstreamError(
                    "overflow", f"{self.max_connections} connections busy"
                ) from None
            if got is not None:
                return got
        return await self.connect()

    async def connect(self) -> UpstreamConnection:
        """A new connection (NEW), counted in `open` from the start of its handshake."""
        # a closed (retired) pool still connects for requests already bound to it, e.g. across
        # a reload; it only stops keeping connections idle
        conn = UpstreamConnection(self)
        await conn.open()
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(POOL_IDLE_TIMEOUT / 5, self._sweep)
        return conn

    def _release(self, conn: UpstreamConnection) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        if self._closed or self.max_idle == 0:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if len(self.idle) > self.max_idle and self._trimmer is None:
            self._trimmer = self.loop.call_later(self.purge_delay, self._purge)

    def _purge(self) -> None:
        """Close the older half (rounded up) of the idle connections past `max_idle`; the
        deque is in release order, so they are the least recently used."""
        self._trimmer = None
        idle = self.idle
        for _ in range((len(idle) - self.max_idle + 1) // 2):
            idle.popleft().close()
        if len(idle) > self.max_idle:
            self._trimmer = self.loop.call_later(self.purge_delay, self._purge)

    def _close_idle(self, deadline: float) -> None:
        """Close the idle connections idle since `deadline` or before (the deque is in release
        order, so they are on the left)."""
        idle = self.idle
        while idle and idle[0].idle_since <= deadline:
            idle.popleft().close()

    def _on_closed(self, conn: UpstreamConnection) -> None:
        """`conn` went CLOSED (called once per connection)."""
        self.open -= 1
        # a waiter may now open its own connection
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def _sweep(self) -> None:
        self._sweeper = None
        self._close_idle(self.loop.time() - POOL_IDLE_TIMEOUT)
        if self.open and not self._closed:
            self._sweeper = self.loop.call_later(POOL_IDLE_TIMEOUT / 5, self._sweep)

    def close(self) -> None:
        self._closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._trimmer is not None:
            self._trimmer.cancel()
            self._trimmer = None


class BackendPool:
    """A named backend: its endpoints (round robin), each with its own pool, and its timeouts."""

    def __init__(self, name: str, endpoints: Sequence[EndpointPool], timeout: float) -> None:
        self.name = name
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._next = 0

    def pick(self) -> EndpointPool:
        eps = self.endpoints
        if len(eps) == 1:
            return eps[0]
        i = self._next
        self._next = (i + 1) % len(eps)
        return eps[i]

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()
