"""Upstream HTTP/2 (`protocol: h2c | h2` on a backend): streams multiplexed over few connections.

The proxy and the shadow lanes drive an upstream exchange through `UpstreamConnection`'s
methods (`send_request`, `write_body`, `end_request`, ...) and hear the answer through a
`ResponseSink`. Here an `H2Stream` is that object for one HTTP/2 stream, so neither the proxy
nor the lanes know which protocol a backend speaks; `H2EndpointPool` hands out streams where
the HTTP/1.1 pool hands out connections:

    H2EndpointPool -> H2ClientConnection (one socket, its `ClientFraming`) -> H2Stream

A connection carries up to the server's SETTINGS_MAX_CONCURRENT_STREAMS streams; the pool
opens another only when every open one is full (at most `max_connections`), and concurrent
callers wait for a connection being opened rather than each opening their own.

Flow control: the answer's DATA is acknowledged as the sink takes it, except while the sink has
paused reading (its client is slow), so a slow client holds the backend's stream window, not
our memory. The request body is sent as the backend's windows allow; past `_HIGH_WATER`
unsent bytes the sink hears `on_upstream_writable(False)`.

gRPC: trailing HEADERS reach the sink as `on_response_trailers`, and a `grpc-timeout` on the
request bounds the whole stream (as well as the backend's idle `timeout`).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from typing import Final, cast

from hpack import NeverIndexedHeaderTuple
from hpack.struct import Header

from shadowlane.wire.h2_framing import (
    CANCEL,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    ClientFraming,
    ConnectionTerminated,
    DataReceived,
    H2Error,
    ResponseReceived,
    SettingsChanged,
    StreamEnded,
    StreamGone,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from shadowlane.wire.h2_send import SendScheduler
from shadowlane.wire.headers import reason_phrase
from shadowlane.wire.messages import Headers
from shadowlane.wire.upstream import (
    POOL_IDLE_TIMEOUT,
    ConnState,
    EndpointPool,
    ResponseSink,
    UpstreamConnection,
    UpstreamError,
    connect,
)

__all__ = ["H2ClientConnection", "H2EndpointPool", "H2Stream", "grpc_timeout"]

_HIGH_WATER: Final = 256 * 1024
_STREAM_WINDOW: Final = 1024 * 1024
#: streams one connection carries at most, whatever the server allows
_MAX_RESERVED: Final = 1000
#: the largest answer header list taken (h2's default SETTINGS_MAX_HEADER_LIST_SIZE, kept)
_MAX_ANSWER_HEADERS: Final = 1 << 16
_CONNECTION_WINDOW: Final = 16 * 1024 * 1024
#: request headers HTTP/2 forbids or carries as pseudo-headers
_DROPPED: Final = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: what RFC 9113 8.2.1 forbids in a field name, and in a field value
_BAD_NAME: Final = re.compile(rb"[\x00-\x20A-Z:\x7f-\xff]")
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
#: what an HTTP/2 message must not carry (RFC 9113 8.2.2)
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_TE_TRAILERS: Final = (b"te", b"trailers")
#: kept out of the HPACK table: credentials (what h2's outbound normalisation did: nghttp2's
#: and Firefox's rule against compression-ratio attacks; cookies under 20 bytes as well), and
#: the request id, new on every request: indexed, each one would push an entry out of the
#: 4 KiB table (those the next requests would have sent as one byte come back as literals, Huffman
#: coded in pure Python) and lengthen hpack's linear search of it for every header
_UNINDEXED: Final = frozenset({b"authorization", b"proxy-authorization", b"x-request-id"})
#: grpc-timeout units (gRPC's PROTOCOL-HTTP2.md) in seconds
_GRPC_UNITS: Final = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def grpc_timeout(value: bytes) -> float | None:
    """`grpc-timeout: 250m` -> 0.25 (seconds); None when malformed (then it is ignored)."""
    value = value.strip()
    if len(value) < 2 or len(value) > 9 or not value[:-1].isdigit():
        return None
    unit = _GRPC_UNITS.get(value[-1])
    if unit is None:
        return None
    return int(value[:-1]) * unit


def malformed_field(name: bytes, value: bytes) -> str | None:
    """Why one regular field of an answer is malformed (RFC 9113 8.2), or None: the checks h2
    makes on inbound headers (`validate_inbound_headers`), made in the loop that reads the
    answer's headers anyway instead of h2's chain of generators."""
    if not name:
        return "empty header name"
    if _BAD_NAME.search(name) is not None:
        return f"illegal character in header name {name!r}"
    if value and _BAD_VALUE.search(value) is not None:
        return f"illegal character in the value of {name.decode('latin-1')}"
    if name in _CONNECTION_SPECIFIC:
        return f"connection-specific header {name.decode('latin-1')}"
    if name == b"te" and value.lower() != b"trailers":
        return "te other than trailers"
    return None


def _parse_head(head: bytes) -> tuple[bytes, bytes, Headers]:
    """The HTTP/1.1 head the proxy and the lanes build (`METHOD target HTTP/1.1\\r\\n...`)
    back to its parts: the one serialisation both protocols' callers share."""
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target = rest.rpartition(b" ")[0]
    headers: Headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b": ")
            headers.append((name, value))
    return method, target, headers


class H2Stream(UpstreamConnection):
    """One request and its answer on one HTTP/2 stream; what the pool hands out.

    It takes the place of an HTTP/1.1 `UpstreamConnection` for its callers (same methods), and
    is used once: a stream is never reused, so `close()` on one that was never sent only gives
    back its place on the connection.
    """

    def __init__(self, conn: H2ClientConnection) -> None:
        # the HTTP/1.1 connection's own state (its parser, its pool count) is not used: every
        # method a caller reaches is overridden below
        self.h2conn = conn
        self.pool = conn.pool
        self.loop = conn.loop
        self.transport = None
        self.state = ConnState.NEW
        self.exchanges = 0
        self.idle_since = 0.0
        self.stream_id = 0
        self.sink: ResponseSink | None = None
        self.head_request = False
        self.started = False
        self.ended = False
        self.out = bytearray()
        self.ending = False
        self.paused = False
        self.unacked = 0
        self.blocked = False
        self.timeout = 0.0
        self.deadline = 0.0
        self.last_activity = 0.0
        self.timer: asyncio.TimerHandle | None = None
        #: the request's HEADERS, until the connection sends them (see `start_stream`)
        self.head_out: list[Header] | None = None

    # ----- request side -----
    def send_request(
        self, head: bytes, sink: ResponseSink, timeout: float, *, head_request: bool = False
    ) -> None:
        self.state = ConnState.BUSY
        self.exchanges = 1
        self.sink = sink
        self.head_request = head_request
        conn = self.h2conn
        method, target, fields = _parse_head(head)
        authority = b""
        headers: list[Header] = [
            (b":method", method),
            (b":scheme", conn.scheme),
            (b":authority", b""),
            (b":path", target),
        ]
        limit = 0.0
        for name, value in fields:
            # what h2's outbound normalisation does, in this loop:
            # names lower-cased (a shadow's added headers keep the config's spelling), values
            # without surrounding whitespace, connection-specific fields dropped, credentials
            # (and the request id) never indexed
            name = name.lower()
            if name in _DROPPED or name == b"te":
                if name == b"host":
                    authority = value
                continue
            if name == b"grpc-timeout":
                limit = grpc_timeout(value) or 0.0
            elif name == b"content-type" and value.startswith(b"application/grpc"):
                # TE is hop-by-hop (the proxy drops the client's), but gRPC servers want
                # `te: trailers` on every call, as Envoy and nginx's grpc_pass send it
                headers.append(_TE_TRAILERS)
            value = value.strip(b" \t")
            if name in _UNINDEXED or (name == b"cookie" and len(value) < 20):
                headers.append(NeverIndexedHeaderTuple(name, value))
            else:
                headers.append((name, value))
        headers[2] = (b":authority", authority or conn.pool.authority)
        now = self.loop.time()
        self.timeout = timeout
        self.last_activity = now
        self.deadline = now + limit if limit else 0.0
        first = timeout if not limit else min(timeout, limit)
        self.timer = self.loop.call_later(first, self._on_timer)
        conn.start_stream(self, headers)

    def write_body(self, data: bytes) -> None:
        if self.ended or not data or self.state == ConnState.CLOSED:
            return
        self.out += data
        self.h2conn.sends.schedule(self)

    def write_parts(self, parts: list[bytes]) -> None:
        for part in parts:
            self.write_body(part)  # framed into DATA frames from `out` anyway

    def write_chunk(self, data: bytes) -> None:
        self.write_body(data)  # DATA frames carry their own length

    def write_chunk_parts(self, data: bytes) -> None:
        self.write_body(data)

    def write_last_chunk(self) -> None:
        """Nothing to send: `end_request` ends the stream."""

    def end_request(self) -> None:
        if self.ended or self.state == ConnState.CLOSED:
            return
        self.ending = True
        self.h2conn.sends.schedule(self)

    # ----- flow control from the sink's client -----
    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        self._ack()

    def _ack(self) -> None:
        if self.unacked and not self.paused:
            n = self.unacked
            self.unacked = 0
            self.h2conn.acknowledge(self.stream_id, n)

    # ----- ending -----
    def abandon(self) -> None:
        """The consumer is gone: cancel the stream (RST_STREAM CANCEL), report nothing."""
        self.sink = None
        self._finish(CANCEL)

    def close(self) -> None:
        self.sink = None
        self._finish(CANCEL)

    def reset(self) -> None:
        """A stream's unsent bytes are its own (`out`): cancelling it drops them."""
        self.abandon()

    def write_buffered(self) -> int:
        """This stream's bytes not yet framed onto the connection (flow control holds them)."""
        return len(self.out)

    def _finish(self, code: int | None) -> None:
        """CLOSED: off the connection, the timer cancelled; `code` resets a live stream."""
        if self.state == ConnState.CLOSED:
            return
        self.state = ConnState.CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.h2conn.stream_done(self, code)

    def _on_timer(self) -> None:
        self.timer = None
        if self.state == ConnState.CLOSED:
            return
        now = self.loop.time()
        idle = now - self.last_activity
        if (not self.deadline or now < self.deadline) and idle < self.timeout:
            wait = self.timeout - idle
            if self.deadline:
                wait = min(wait, self.deadline - now)
            self.timer = self.loop.call_later(max(wait, 0.001), self._on_timer)
            return
        sink = self.sink
        self.sink = None
        self._finish(CANCEL)
        if sink is not None:
            why = (
                "grpc-timeout passed"
                if self.deadline and now >= self.deadline
                else f"no answer in {self.timeout:g}s"
            )
            sink.on_upstream_error(UpstreamError("timeout", why), False)

    # ----- the connection's events for this stream -----
    def on_head(self, headers: Headers) -> None:
        self.last_activity = self.loop.time()
        status = 0
        content_length: int | None = None
        out: Headers = []
        why: str | None = None
        for i, (name, value) in enumerate(headers):
            if name[:1] == b":":
                # RFC 9113 8.3.2: :status, once, first; no other pseudo-header in an answer
                if name != b":status" or i != 0 or len(value) != 3 or not value.isdigit():
                    why = "malformed pseudo-header in the answer"
                    break
                status = int(value)
                continue
            why = malformed_field(name, value)
            if why is not None:
                break
            if name == b"content-length":
                if not value.isdigit() or content_length is not None:
                    why = "malformed or repeated content-length"
                    break
                content_length = int(value)
            out.append((name, value))
        if why is None and not status:
            why = "answer without :status"
        if why is not None:
            self.malformed(why)
            return
        self.started = True
        sink = self.sink
        if sink is not None:
            sink.on_response_head(status, reason_phrase(status), out, content_length)

    def malformed(self, why: str) -> None:
        """The backend's answer is malformed (RFC 9113 8.1.1): the stream is reset with
        PROTOCOL_ERROR and the caller hears a protocol error; the connection's other streams
        go on."""
        sink = self.sink
        self.sink = None
        self._finish(PROTOCOL_ERROR)
        if sink is not None:
            sink.on_upstream_error(UpstreamError("protocol", why), False)

    def on_data(self, data: bytes, flow_length: int) -> None:
        self.last_activity = self.loop.time()
        self.unacked += flow_length
        sink = self.sink
        if sink is not None:
            if data:
                sink.on_response_body(data)
        else:
            self.paused = False
        self._ack()

    def on_trailers(self, headers: Headers) -> None:
        # plain tuples: hpack's are a tuple subclass that does not survive pickling (the
        # trailers go to the comparison children)
        out: Headers = []
        for name, value in headers:
            why = (
                "pseudo-header in the trailers"
                if name[:1] == b":"
                else malformed_field(name, value)
            )
            if why is not None:
                self.malformed(why)
                return
            out.append((name, value))
        sink = self.sink
        if sink is not None:
            sink.on_response_trailers(out)

    def on_end(self) -> None:
        sink = self.sink
        self.sink = None
        # the backend may answer before the whole request was sent: the rest is not wanted
        self._finish(None if self.ended else NO_ERROR)
        if sink is not None:
            sink.on_response_end()

    def on_error(self, err: UpstreamError, retryable: bool) -> None:
        sink = self.sink
        self.sink = None
        self._finish(None)
        if sink is not None:
            sink.on_upstream_error(err, retryable and not self.started)

    def set_blocked(self, blocked: bool) -> None:
        if blocked != self.blocked:
            self.blocked = blocked
            if self.sink is not None:
                self.sink.on_upstream_writable(not blocked)

    def data_end(self) -> None:
        if self.sink is not None:
            self.sink.on_data_end()


class H2ClientConnection:
    """One HTTP/2 connection to one endpoint: the socket, its framing (`ClientFraming`), and the
    streams it carries (an asyncio Protocol by its methods; `_Transport` forwards to it)."""

    def __init__(self, pool: H2EndpointPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        # the framing is ours (wire.h2_framing, compiled, as on the listener); header rules
        # are `H2Stream.send_request`'s on the way out and `on_head` / `on_trailers`' on the
        # way in, in the loops that read the headers anyway
        self.h2 = ClientFraming(_MAX_ANSWER_HEADERS, _STREAM_WINDOW)
        self.scheme = b"https" if pool.ssl_context is not None else b"http"
        self.streams: dict[int, H2Stream] = {}
        #: streams handed out, started or not (what max concurrent streams bounds)
        self.reserved = 0
        #: streams with something to send, sent together once per loop iteration
        self.sends: SendScheduler[H2Stream] = SendScheduler(self.loop, self.pump, self._flush)
        self.usable = False
        self.closed = False
        #: the server's SETTINGS have come (its concurrent-stream limit is known)
        self.settings_seen = False
        self.idle_timer: asyncio.TimerHandle | None = None

    @property
    def capacity(self) -> int:
        """Streams this connection can take now (the server's limit minus those it carries)."""
        if not self.usable:
            return 0
        # until the server's SETTINGS arrive, the 100 RFC 9113 says it should allow: more
        # might be refused, and a refused POST is not retried
        limit = self.h2.remote_max_concurrent_streams if self.settings_seen else 100
        return min(limit, _MAX_RESERVED) - self.reserved

    async def open(self) -> None:
        try:
            await connect(self.loop, lambda: _Protocol(self), self.pool)
        except BaseException:
            self.close()
            raise
        transport = self.transport
        if transport is None:
            raise UpstreamError("reset", "connection closed during the handshake")
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            self.close()
            raise UpstreamError("tls", "the backend did not agree to h2 by ALPN")

    # ----- Protocol callbacks (through _Protocol) -----
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # many streams' small writes share this socket: Nagle would hold each behind the
            # backend's delayed ACK (40 ms) whenever two are in flight
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.usable = True
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self.usable = False
        if not was_closed:
            self.pool.conn_closed(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.on_error(UpstreamError("reset", "connection closed"), False)
        self.sends.detach()

    def data_received(self, data: bytes) -> None:
        sends = self.sends
        sends.receiving = True
        try:
            self._receive(data)
        finally:
            sends.receiving = False
        sends.run()

    def _receive(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except H2Error as exc:
            self._flush()
            streams = list(self.streams.values())
            self.streams.clear()
            self.close()
            for broken in streams:
                broken.on_error(UpstreamError("protocol", str(exc)), False)
            return
        touched: list[H2Stream] = []
        stream: H2Stream | None
        for event in events:
            if isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.on_data(event.data, event.flow_length)
                    touched.append(stream)
                elif event.flow_length:
                    self.acknowledge(event.stream_id, event.flow_length)
            elif isinstance(event, ResponseReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.on_head(event.headers)
                    touched.append(stream)
            elif isinstance(event, TrailersReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.on_trailers(event.headers)
            elif isinstance(event, StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.on_end()
            elif isinstance(event, StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    code = event.error_code
                    stream.on_error(
                        UpstreamError("reset", f"stream reset by the backend (code {code})"),
                        code == REFUSED_STREAM,
                    )
            elif isinstance(event, WindowUpdated):
                if event.stream_id:
                    stream = self.streams.get(event.stream_id)
                    if stream is not None:
                        self.pump(stream)
                else:
                    for waiting in list(self.streams.values()):
                        if waiting.out or waiting.ending:
                            self.pump(waiting)
            elif isinstance(event, SettingsChanged):
                self.settings_seen = True
                self.pool.slot_free(self)  # a higher limit makes room for waiters
            elif isinstance(event, ConnectionTerminated):
                # GOAWAY: streams above last_stream_id were never processed (safe to retry)
                self.usable = False
                last = event.last_stream_id
                for sid, refused in list(self.streams.items()):
                    if sid > last:
                        refused.on_error(UpstreamError("reset", "GOAWAY from the backend"), True)
        for done in touched:
            done.data_end()
        if not self.usable and not self.streams:
            self.close()

    def pause_writing(self) -> None:
        for stream in self.streams.values():
            stream.set_blocked(True)

    def resume_writing(self) -> None:
        for stream in list(self.streams.values()):
            stream.set_blocked(len(stream.out) > _HIGH_WATER)

    # ----- streams -----
    def reserve(self) -> H2Stream:
        self.reserved += 1
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        return H2Stream(self)

    def start_stream(self, stream: H2Stream, headers: list[Header]) -> None:
        """The request's HEADERS go out with the rest of this loop iteration's sends (so a
        request without a body is one HEADERS frame with END_STREAM)."""
        if self.closed or not self.usable:
            self.loop.call_soon(stream.on_error, UpstreamError("reset", "connection closed"), True)
            return
        stream.head_out = headers
        self.sends.schedule(stream)

    def _send_head(self, stream: H2Stream, head: list[Header]) -> bool:
        stream.head_out = None
        if self.closed or not self.usable:
            self.loop.call_soon(stream.on_error, UpstreamError("reset", "connection closed"), True)
            return False
        sid = self.h2.get_next_available_stream_id()
        stream.stream_id = sid
        self.streams[sid] = stream
        last = stream.ending and not stream.out
        try:
            self.h2.send_headers(sid, head, end_stream=last)
        except StreamGone as exc:
            self.streams.pop(sid, None)
            self.loop.call_soon(stream.on_error, UpstreamError("protocol", str(exc)), True)
            return False
        stream.ended = last
        if self.h2.streams_left < _MAX_RESERVED:
            # the stream ids run out: the streams reserved so far still fit, new ones go to
            # another connection, and this one closes when its last stream is done
            self.usable = False
        return True

    def pump(self, stream: H2Stream) -> None:
        """Send the stream's head, its pending body within the windows, and its end (nothing
        for a stream closed since it was scheduled: its HEADERS must not go out)."""
        if stream.state == ConnState.CLOSED:
            return
        head = stream.head_out
        if head is not None and not self._send_head(stream, head):
            return
        sid = stream.stream_id
        if self.closed or sid not in self.streams:
            return
        h2 = self.h2
        out = stream.out
        try:
            while out and not stream.ended:
                room = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = bytes(out[:room])
                del out[:room]
                last = not out and stream.ending
                h2.send_data(sid, chunk, end_stream=last)
                stream.ended = last
            if not out and stream.ending and not stream.ended:
                stream.ended = True
                h2.end_stream(sid)
        except StreamGone:
            pass  # the stream is gone (reset by the backend): its events say so
        # (no flush here: pump runs from `_run` and from reading, and both write after it)
        stream.set_blocked(len(out) > _HIGH_WATER)

    def acknowledge(self, stream_id: int, n: int) -> None:
        if self.closed:
            return
        self.h2.acknowledge_received_data(n, stream_id)
        self.sends.kick()

    def stream_done(self, stream: H2Stream, code: int | None) -> None:
        self.reserved -= 1
        sid = stream.stream_id
        if sid and self.streams.pop(sid, None) is not None and code is not None:
            self.h2.reset_stream(sid, code)
            self.sends.kick()
        if self.reserved <= 0:
            self.reserved = 0
            if not self.usable or self.pool.closed:
                self.close()
            elif self.idle_timer is None:
                self.idle_timer = self.loop.call_later(POOL_IDLE_TIMEOUT, self.close)
        self.pool.slot_free(self)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.usable = False
        if not self.closed:
            self.closed = True
            self.pool.conn_closed(self)
            if self.transport is not None:
                self.h2.close_connection()
                data = self.h2.data_to_send()
                if data:
                    self.transport.write(data)
                self.transport.close()


class _Protocol(asyncio.Protocol):
    """The asyncio face of an `H2ClientConnection` (kept apart so the connection object can
    exist, and be counted by the pool, before its socket does)."""

    def __init__(self, conn: H2ClientConnection) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.connection_made(cast(asyncio.Transport, transport))

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.conn.data_received(data)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


class H2EndpointPool(EndpointPool):
    """HTTP/2 connections to one endpoint, handing out streams: at most `max_connections`
    connections, each carrying up to the server's concurrent-stream limit."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        max_connections: int,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["h2"])
        super().__init__(
            host,
            port,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            max_idle=0,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
        )
        self.conns: list[H2ClientConnection] = []
        self.opening: asyncio.Future[None] | None = None
        self.slot_waiters: list[asyncio.Future[None]] = []
        self.closed = False

    def get_idle(self) -> UpstreamConnection | None:
        """A stream on an open connection with room for one, or None."""
        for conn in self.conns:
            if conn.capacity > 0:
                return conn.reserve()
        return None

    async def acquire(self) -> UpstreamConnection:
        deadline = self.loop.time() + self.connect_timeout
        while True:
            stream = self.get_idle()
            if stream is not None:
                return stream
            opening = self.opening
            if opening is not None:
                # one connect at a time: those who came meanwhile share it
                await asyncio.shield(opening)
                continue
            if len(self.conns) < self.max_connections:
                return await self.connect()
            fut: asyncio.Future[None] = self.loop.create_future()
            self.slot_waiters.append(fut)
            left = deadline - self.loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                raise UpstreamError(
                    "overflow", f"{self.max_connections} connections full of streams"
                ) from None
            finally:
                if fut in self.slot_waiters:
                    self.slot_waiters.remove(fut)

    async def connect(self) -> UpstreamConnection:
        """A stream on a new connection (a retry after a stale one, or the first)."""
        conn = H2ClientConnection(self)
        self.conns.append(conn)
        opening: asyncio.Future[None] = self.loop.create_future()
        if self.opening is None:
            self.opening = opening
        try:
            await conn.open()
        finally:
            if self.opening is opening:
                self.opening = None
            if not opening.done():
                opening.set_result(None)
        return conn.reserve()

    def slot_free(self, conn: H2ClientConnection) -> None:
        while self.slot_waiters:
            fut = self.slot_waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                return

    def conn_closed(self, conn: H2ClientConnection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        self.slot_free(conn)

    def close(self) -> None:
        """Retired (a reload replaced this backend): connections close once their streams
        have ended; new streams still go where callers bound to this pool send them."""
        self.closed = True
        for conn in list(self.conns):
            if conn.reserved == 0:
                conn.close()
