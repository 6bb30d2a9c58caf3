"""Downstream HTTP/2: h2c with prior knowledge and h2 by ALPN, each stream an `Exchange`.

The framing is `wire.h2_framing`'s (a sans-I/O state machine, compiled; it replaced the `h2`
library here, whose cost per request was more than the rest of the request's): this module
feeds it bytes, turns its events into exchanges, and writes what it has to send. A
stream becomes an `H2Exchange`, the same kind of object an HTTP/1.1 request is, so the proxy,
the shadows, the metrics and the access log see a request, not frames.

What HTTP/2 adds over the HTTP/1.1 server, and where it lives here:

* Streams run concurrently: each is dispatched as soon as its head is accepted (no queue).
* Flow control both ways. Request DATA is acknowledged (WINDOW_UPDATE) only once it has been
  handed to the application and the application has not paused the body, so a slow backend
  holds the client's window, not our memory. Response DATA goes out as the client's windows
  allow; a stream whose unsent bytes pass `_HIGH_WATER` tells its producer to pause
  (`on_writable(False)`), exactly as a full socket buffer does on HTTP/1.1.
* A stream the proxy answers before its upload ended (413, 404) is reset with NO_ERROR after
  the answer (RFC 9113 8.1), the HTTP/2 form of `Connection: close`; a truncated answer is
  reset with INTERNAL_ERROR, never ended cleanly.
* Drain: a GOAWAY naming the last stream taken; those streams finish, later ones are refused.

`H2Listener` owns the HTTP/2 connections of a listener and decides, once per connection, which
protocol a new connection speaks (`Sniffer`): ALPN on TLS, the 24-byte preface on cleartext.
An HTTP/1.1 connection is handed to the usual `ServerConnection` after that one check, and pays
nothing per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Callable
from typing import Final, cast

from shadowlane.wire.exchange import Connection, Exchange
from shadowlane.wire.h2_framing import (
    ENHANCE_YOUR_CALM,
    INTERNAL_ERROR,
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    ConnectionTerminated,
    DataReceived,
    H2Error,
    RequestReceived,
    ServerFraming,
    StreamEnded,
    StreamGone,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from shadowlane.wire.h2_send import SendScheduler
from shadowlane.wire.messages import Headers, Request
from shadowlane.wire.request_head import Rejection, RequestHead, decide_head
from shadowlane.wire.server import App, ServerLimits, ServerState

__all__ = [
    "LIMIT_CONTROL_FLOOD",
    "LIMIT_RESET_FLOOD",
    "PREFACE",
    "H2Exchange",
    "H2Listener",
    "H2ServerConnection",
    "Sniffer",
]

#: unsent response bytes of one stream above which its producer is paused
_HIGH_WATER: Final = 256 * 1024
_LOW_WATER: Final = 64 * 1024
#: the window each request stream starts with (the client may send this much unacknowledged)
_STREAM_WINDOW: Final = 1024 * 1024
#: the connection's receive window (raised from the RFC's 64 KiB at start)
_CONNECTION_WINDOW: Final = 16 * 1024 * 1024
#: headers HTTP/2 forbids (RFC 9113 8.2.2); the proxy's own filters remove most already
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_GRPC_PREFIX: Final = "application/grpc"
#: a stream the client resets sooner than this after opening it, unanswered, is premature...
_PREMATURE: Final = 1.0
#: ... and past this many, when they are more than half of its streams, the client is
#: flooding resets: the connection ends (Envoy's rule; its threshold is 500 streams)
_RESET_FLOOD_MIN: Final = 100
#: the `limit` label of a connection ended for a reset flood
LIMIT_RESET_FLOOD: Final = "h2_reset_flood"
#: PING/SETTINGS acknowledgements queued while the client does not read (its socket full and
#: the transport paused) past which it is flooding control frames (Envoy's
#: `max_outbound_control_frames`, 1000; CVE-2019-9512 and -9515): the connection is aborted
_CONTROL_FLOOD: Final = 1000
#: ... and the `limit` label it is counted under
LIMIT_CONTROL_FLOOD: Final = "h2_control_flood"
#: what RFC 9113 8.2.1 forbids in a field name (a pseudo-header's leading colon is cut first)
_BAD_NAME: Final = re.compile(rb"[\x00-\x20A-Z:\x7f-\xff]")
#: ... and in a field value: NUL, CR, LF anywhere, whitespace at either end
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":path", b":authority", b":protocol"})


def malformed_request(headers: Headers) -> str | None:
    """Why a request's header block is malformed (RFC 9113 8.2, 8.3.1), or None.

    These are the checks h2 makes on inbound headers (`validate_inbound_headers`), done here
    in one loop over the pairs instead of h2's chain of seven generators (the framing,
    `wire.h2_framing`, leaves header semantics to this function). `decide_head` applies the
    HTTP rules after this (Host syntax, Content-Length, Expect, ...).
    """
    seen: set[bytes] = set()
    regular = False
    method: bytes | None = None
    authority: bytes | None = None
    host: bytes | None = None
    for name, value in headers:
        if not name:
            return "empty header name"
        if name[0] == 0x3A:  # ":"
            if regular:
                return "pseudo-header after a regular header"
            if name not in _REQUEST_PSEUDO:
                return "unknown pseudo-header"
            if name in seen:
                return "duplicate pseudo-header"
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                return "empty :path"
            if _BAD_NAME.search(name, 1) is not None:
                return "illegal character in a header name"
        else:
            regular = True
            if _BAD_NAME.search(name) is not None:
                return "illegal character in a header name"
            if name in _CONNECTION_SPECIFIC:
                return "connection-specific header"
            if name == b"te" and value.lower() != b"trailers":
                return "te other than trailers"
            if name == b"host":
                if host is not None:
                    return "duplicate host"
                host = value
        if value and _BAD_VALUE.search(value) is not None:
            return "illegal character in a header value"
    if method is None:
        return "missing :method"
    if method == b"CONNECT" and b":protocol" not in seen:
        if b":scheme" in seen or b":path" in seen:
            return "CONNECT with :scheme or :path"
    else:
        if b":scheme" not in seen or b":path" not in seen:
            return "missing :scheme or :path"
        if b":protocol" in seen and method != b"CONNECT":
            return ":protocol outside CONNECT"
    if authority is None and host is None:
        return "neither :authority nor host"
    if authority is not None and host is not None and authority != host:
        return ":authority and host differ"
    return None


def grpc_status_for(status: int) -> bytes:
    """The gRPC status a client gets when the proxy itself answers a gRPC call with `status`
    (the mapping gRPC's own HTTP-to-gRPC table uses, and Envoy's for its local replies)."""
    if status == 504:
        return b"4"  # DEADLINE_EXCEEDED
    if status in (502, 503):
        return b"14"  # UNAVAILABLE
    if status == 404:
        return b"12"  # UNIMPLEMENTED
    if status == 413 or status == 431:
        return b"8"  # RESOURCE_EXHAUSTED
    if status == 401:
        return b"16"  # UNAUTHENTICATED
    if status == 403:
        return b"7"  # PERMISSION_DENIED
    return b"13"  # INTERNAL


def parse_fields(fields: bytes) -> Headers:
    """`name: value\\r\\n`... (what the proxy serialises for HTTP/1.1) back to pairs, minus
    what HTTP/2 forbids."""
    out: Headers = []
    for line in fields.split(b"\r\n"):
        if not line:
            continue
        name, _, value = line.partition(b": ")
        if name in _CONNECTION_SPECIFIC:
            continue
        out.append((name, value))
    return out


class H2Exchange(Exchange):
    """One HTTP/2 stream as the proxy sees it: an `Exchange` whose framing is h2's."""

    def __init__(self, conn: H2ServerConnection, request: Request, stream_id: int) -> None:
        super().__init__(conn, request)
        self.h2conn = conn
        self.stream_id = stream_id
        #: request bytes received (flow-controlled length) but not yet acknowledged
        self.unacked = 0
        self.body_paused = False
        #: the response head, held until the first body bytes or the end
        self.head_out: Headers | None = None
        #: response bytes waiting for window
        self.out = bytearray()
        self.ending = False
        self.trailers: Headers | None = None
        #: the stream is over at the h2 level (ended, reset); nothing more is sent on it
        self.closed = False
        #: the producer was told to pause (on_writable(False)) and not yet to resume
        self.blocked = False
        #: reset the stream with NO_ERROR once the answer is out (the upload is not wanted)
        self.reset_after = False
        self.started = conn.loop.time()
        content_type = request.header("content-type")
        #: a gRPC call: the proxy's own answers to it speak grpc-status (see `respond`)
        self.grpc = content_type is not None and content_type.startswith(_GRPC_PREFIX)

    # ----- request body and its flow control -----
    def set_body_consumer(
        self, on_body: Callable[[bytes], None], on_end: Callable[[], None]
    ) -> None:
        if self.expect_continue and not self.body_done and not self.response_started:
            self.h2conn.send_informational(self.stream_id)
        self.expect_continue = False
        super().set_body_consumer(on_body, on_end)
        self._ack()

    def release_body(self) -> None:
        super().release_body()
        self._ack()

    def pause_body(self) -> None:
        self.body_paused = True

    def resume_body(self) -> None:
        self.body_paused = False
        self._ack()

    def data(self, chunk: bytes, flow_length: int) -> None:
        self.unacked += flow_length
        self._feed_body(chunk)
        self._ack()

    def _ack(self) -> None:
        """Give the client its window back for what the application has taken (or what is
        dropped): never for bytes still buffered here or held by a paused application."""
        if self.unacked and not self.body_paused and not self._buffering():
            n = self.unacked
            self.unacked = 0
            self.h2conn.acknowledge(self.stream_id, n)

    def _buffering(self) -> bool:
        return self._body_buffer is not None and self._on_body is None

    # ----- response -----
    def start_response_fields(
        self,
        status: int,
        reason: bytes,
        fields: bytes,
        content_length: int | None,
        *,
        close: bool = False,
    ) -> None:
        self.response_started = True
        self.status = status
        self.expect_continue = False
        head: Headers = [(b":status", b"%d" % status)]
        head.extend(parse_fields(fields))
        if content_length is not None and not (status < 200 or status in (204, 304)):
            head.append((b"content-length", b"%d" % content_length))
        if close and not self.body_done:
            self.reset_after = True
        self.head_out = head

    def send_body(self, data: bytes) -> None:
        if not data or self.head_request or self.closed:
            return
        self.out += data
        self.h2conn.sends.schedule(self)

    def flush(self) -> None:
        if self.head_out is not None and not self.closed:
            self.h2conn.sends.schedule(self)

    def send_trailers(self, trailers: Headers) -> None:
        self.trailers = [(n, v) for n, v in trailers if n not in _CONNECTION_SPECIFIC]

    def end_response(self) -> None:
        if self.response_done:
            return
        self.response_done = True
        self.ending = True
        self.on_abort = self.on_writable = None
        conn = self.h2conn
        if not self.closed:
            conn.sends.schedule(self)
        conn._exchange_done(self)

    def respond(
        self, status: int, body: bytes, *, close: bool = False, headers: Headers | None = None
    ) -> None:
        if not self.grpc:
            super().respond(status, body, close=close, headers=headers)
            return
        # a gRPC client reads its call's fate from grpc-status, not the HTTP status: the
        # answer is "trailers only" (RFC-less, per the gRPC HTTP/2 protocol), HTTP 200
        message = body.strip().decode("latin-1", "replace")
        fields = b"content-type: application/grpc\r\ngrpc-status: %s\r\ngrpc-message: %s\r\n" % (
            grpc_status_for(status),
            _percent_encode(message),
        )
        self.start_response_fields(200, b"OK", fields, None, close=close)
        self.status = status
        self.end_response()

    def abort(self) -> None:
        """Reset the stream (not the connection): a truncated answer must not look whole."""
        self.on_abort = self.on_writable = None
        self.h2conn.reset(self, INTERNAL_ERROR)
        if not self.response_done:
            self.response_done = True
            self.h2conn._exchange_done(self)


def _percent_encode(text: str) -> bytes:
    """grpc-message is percent-encoded UTF-8 (gRPC's PROTOCOL-HTTP2.md)."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


class H2ServerConnection(Connection):
    """One HTTP/2 client connection: h2 for the frames, an `H2Exchange` per stream."""

    def __init__(self, listener: H2Listener) -> None:
        self.listener = listener
        self.app = listener.app
        self.limits = listener.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.draining = listener.draining
        # the framing is ours (wire.h2_framing, compiled): h2's cost per request was more
        # than the rest of the request's; inbound header rules are `malformed_request`'s
        self.h2 = ServerFraming(
            listener.max_streams, listener.limits.max_header_size, _STREAM_WINDOW
        )
        #: every stream that still has something to do: a request in flight or bytes to send
        self.streams: dict[int, H2Exchange] = {}
        #: streams the application has not finished answering (what drain waits for)
        self.active = 0
        #: streams opened, and those the client reset within `_PREMATURE` of opening them
        #: before their answer ended (the rapid-reset count)
        self.opened = 0
        self.premature_resets = 0
        self.client_addr = ""
        self.closed = False
        self.write_paused = False
        #: the last stream id a GOAWAY promised to serve (draining), or -1
        self.goaway_last = -1
        #: streams with something to send, sent together once per loop iteration (or at the
        #: end of the bytes being read): one write and one DATA frame with END_STREAM where
        #: the proxy made three calls
        self.sends: SendScheduler[H2Exchange] = SendScheduler(self.loop, self.pump, self._flush)
        self.idle_since = self.loop.time()

    # ----- asyncio callbacks -----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.listener.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client_addr = peer[0] if peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self._flush()
        if self.draining:
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connections.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for ex in streams:
            self._stream_gone(ex)
        self.sends.detach()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        sends = self.sends
        sends.receiving = True
        try:
            self._receive(data)
        finally:
            sends.receiving = False
        sends.run()

    def _receive(self, data: bytes) -> None:
        h2 = self.h2
        try:
            events = h2.receive_data(data)
        except H2Error:
            # h2 has queued the GOAWAY naming the error: send it and close
            self._flush()
            self.close()
            return
        if not self.write_paused:
            h2.control_out = 0  # what was queued is on its way: the client reads
        elif h2.control_out > _CONTROL_FLOOD:
            self._control_flood()
            return
        for event in events:
            if isinstance(event, DataReceived):
                ex = self.streams.get(event.stream_id)
                if ex is not None:
                    ex.data(event.data, event.flow_length)
                elif event.flow_length:
                    self.acknowledge(event.stream_id, event.flow_length)
            elif isinstance(event, RequestReceived):
                if not self._request(event):
                    return
            elif isinstance(event, StreamEnded):
                ex = self.streams.get(event.stream_id)
                if ex is not None:
                    if not ex.body_done:
                        ex._end_body()
                    if ex.closed:  # answered already; it stayed for the rest of the upload
                        del self.streams[event.stream_id]
                        if self.draining and not self.streams:
                            self.loop.call_soon(self._close_if_done)
            elif isinstance(event, WindowUpdated):
                if event.stream_id:
                    ex = self.streams.get(event.stream_id)
                    if ex is not None:
                        self.pump(ex)
                else:
                    for ex in list(self.streams.values()):
                        if ex.out or ex.head_out is not None or ex.ending:
                            self.pump(ex)
            elif isinstance(event, StreamReset):
                ex = self.streams.pop(event.stream_id, None)
                if ex is not None:
                    ex.closed = True
                    if not ex.response_done and self.loop.time() - ex.started < _PREMATURE:
                        self.premature_resets += 1
                    self._stream_gone(ex)
                    if (
                        self.premature_resets >= _RESET_FLOOD_MIN
                        and self.premature_resets * 2 > self.opened
                    ):
                        self._reset_flood()
                        return
            elif isinstance(event, TrailersReceived):
                # request trailers: HTTP/1.1 upstreams cannot carry them (httptools drops
                # theirs too); the stream's end follows as StreamEnded
                pass
            elif isinstance(event, ConnectionTerminated):
                self._flush()
                self.close()
                return

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        for ex in self.streams.values():
            self._set_blocked(ex, True)

    def resume_writing(self) -> None:
        self.write_paused = False
        for ex in list(self.streams.values()):
            self._set_blocked(ex, len(ex.out) > _LOW_WATER)

    # ----- streams -----
    def _request(self, event: RequestReceived) -> bool:
        """Start the stream's exchange; False when the header block was malformed and the
        connection is closed for it (GOAWAY PROTOCOL_ERROR, as h2 itself would have)."""
        sid = event.stream_id
        fields = event.headers
        if malformed_request(fields) is not None:
            self.h2.close_connection(PROTOCOL_ERROR)
            self._flush()
            self.close()
            return False
        if self.goaway_last >= 0 and sid > self.goaway_last:
            self.h2.reset_stream(sid, REFUSED_STREAM)
            return True
        method = b""
        path = b""
        authority = b""
        headers: Headers = []
        cookies: list[bytes] = []
        for n, v in fields:
            if n[:1] == b":":
                if n == b":method":
                    method = v
                elif n == b":path":
                    path = v
                elif n == b":authority":
                    authority = v
            elif n == b"cookie":
                cookies.append(v)  # RFC 9113 8.2.3: split crumbs are joined for HTTP/1.1
            elif n == b"te":
                continue  # hop-by-hop ("trailers" only, h2 checks): an HTTP/2 backend gets
                # it again for a gRPC call (wire.h2_upstream)
            else:
                headers.append((n, v))
        if cookies:
            headers.append((b"cookie", b"; ".join(cookies)))
        if authority and not any(n == b"host" for n, _ in headers):
            headers.append((b"host", authority))
        head: RequestHead | Rejection = decide_head(
            method, path, "1.1", headers, self.limits.max_header_size
        )
        ended = event.ended
        if ended and isinstance(head, RequestHead) and head.content_length:
            head = Rejection(400, "content-length announces a body the stream does not carry")
        request: Request
        if isinstance(head, Rejection):
            request = Request(method.decode("latin-1"), path, "2", headers, "", "", True)
            request.client_addr = self.client_addr
            ex = H2Exchange(self, request, sid)
            self._add(ex)
            if ended:
                ex._end_body()
            ex.respond(head.status, head.reason.encode() + b"\n", close=True)
            return True
        request = Request(
            head.method, head.target, "2", head.headers, head.host, self.client_addr, True
        )
        ex = H2Exchange(self, request, sid)
        ex.content_length = head.content_length
        ex.chunked = head.content_length is None and not ended
        ex.expect_continue = head.expect_continue
        self._add(ex)
        if ended:
            ex.body_done = True
        self.app.handle(ex)
        return True

    def _add(self, ex: H2Exchange) -> None:
        self.streams[ex.stream_id] = ex
        self.active += 1
        self.opened += 1

    def _reset_flood(self) -> None:
        """Rapid reset (CVE-2023-44487): most of this client's streams were reset by itself
        right after it opened them, each one costing a backend request it never waits for.
        The connection ends (GOAWAY ENHANCE_YOUR_CALM), as Envoy ends it (its
        `premature_reset_*` rule: half of the streams, reset within a second)."""
        self.h2.close_connection(ENHANCE_YOUR_CALM)
        self._flush()
        self.close()
        self.listener.http1.limit_hit(LIMIT_RESET_FLOOD)

    def _control_flood(self) -> None:
        """The client keeps sending PINGs (or SETTINGS) and does not read the answers: each
        is an acknowledgement queued in memory, for free on its side. Aborted, not closed: a
        close would wait for the client to read what is queued, which it does not."""
        self.abort()
        self.listener.http1.limit_hit(LIMIT_CONTROL_FLOOD)

    def _stream_gone(self, ex: H2Exchange) -> None:
        """The stream ended under the application (reset by the client, connection lost)."""
        ex.closed = True
        ex._body_lost()
        if not ex.response_done:
            ex.response_done = True
            callback = ex.on_abort
            ex.on_abort = ex.on_writable = None
            self._exchange_done(ex)
            if callback is not None:
                callback()

    def _exchange_done(self, ex: Exchange) -> None:
        self.active -= 1
        if self.active <= 0:
            self.active = 0
            self.idle_since = self.loop.time()
            if self.draining:
                self.loop.call_soon(self._close_if_done)

    def acknowledge(self, stream_id: int, n: int) -> None:
        if self.closed:
            return
        self.h2.acknowledge_received_data(n, stream_id)
        self.sends.kick()

    def send_informational(self, stream_id: int) -> None:
        with contextlib.suppress(StreamGone):
            self.h2.send_headers(stream_id, [(b":status", b"100")])
        self.sends.kick()

    def pump(self, ex: H2Exchange) -> None:
        """Send what `ex` has (head, body within the windows, trailers, the end)."""
        if ex.closed or self.closed:
            return
        h2 = self.h2
        sid = ex.stream_id
        try:
            head = ex.head_out
            if head is not None:
                ex.head_out = None
                only_head = ex.ending and not ex.out and ex.trailers is None
                h2.send_headers(sid, head, end_stream=only_head)
                if only_head:
                    self._finished(ex)
                    return
            out = ex.out
            while out:
                room = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = bytes(out[:room])
                del out[:room]
                last = not out and ex.ending and ex.trailers is None
                h2.send_data(sid, chunk, end_stream=last)
                if last:
                    self._finished(ex)
                    return
            if not out and ex.ending:
                if ex.trailers is not None:
                    h2.send_headers(sid, ex.trailers, end_stream=True)
                else:
                    h2.end_stream(sid)
                self._finished(ex)
        except StreamGone:
            # the stream closed under us (reset by the client between events)
            ex.closed = True
            self.streams.pop(sid, None)
        if not ex.closed:
            self._set_blocked(ex, self.write_paused or len(ex.out) > _HIGH_WATER)

    def _finished(self, ex: H2Exchange) -> None:
        """The answer is all out: the stream is done here (after a NO_ERROR reset when the
        proxy answered without wanting the rest of the upload)."""
        ex.closed = True
        if ex.body_done:
            self.streams.pop(ex.stream_id, None)
        elif ex._on_body is not None and not ex.reset_after:
            pass  # the application still reads the upload (shadow copies): the stream stays
        else:
            self.streams.pop(ex.stream_id, None)
            self.h2.reset_stream(ex.stream_id, NO_ERROR)
            ex._body_lost()
        if self.draining and not self.streams:
            self.loop.call_soon(self._close_if_done)

    def _set_blocked(self, ex: H2Exchange, blocked: bool) -> None:
        if blocked == ex.blocked:
            return
        if not blocked and self.write_paused:
            return
        ex.blocked = blocked
        cb = ex.on_writable
        if cb is not None:
            cb(not blocked)

    def reset(self, ex: H2Exchange, code: int) -> None:
        if not ex.closed and not self.closed:
            ex.closed = True
            self.streams.pop(ex.stream_id, None)
            self.h2.reset_stream(ex.stream_id, code)
            self.sends.kick()

    # ----- connection -----
    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def write(self, data: bytes) -> None:
        """Raw bytes are HTTP/1.1's: an HTTP/2 exchange never writes through here."""
        raise RuntimeError("HTTP/2 exchanges send through h2, not raw writes")

    def pause_reading_for(self, reason: str) -> None:
        """Per stream instead: the stream's window is not given back (see `H2Exchange`)."""

    def resume_reading_for(self, reason: str) -> None:
        """Per stream instead (see `pause_reading_for`)."""

    def drain(self) -> None:
        """GOAWAY (NO_ERROR) naming the last stream taken: those finish, later ones are
        refused; the connection closes once nothing is left."""
        self.draining = True
        if self.closed or self.goaway_last >= 0:
            return
        self.sends.run()  # what the streams have goes before the GOAWAY
        self.goaway_last = self.h2.highest_inbound_stream_id
        # a GOAWAY that leaves the framing open, so the streams it promised can still finish
        self.h2.goaway(self.goaway_last, NO_ERROR)
        self._flush()
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.active == 0 and not self.streams:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.sends.run()  # the last answers and resets, before the socket closes
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        self.closed = True
        transport.abort()

    @property
    def busy(self) -> bool:
        """A stream is in flight, or an answer still waits for the client's window."""
        return self.active > 0 or bool(self.streams)


class H2Listener:
    """A listener's HTTP/2 side: its connections, their idle sweep, draining, and the
    per-connection choice between HTTP/2 and HTTP/1.1."""

    def __init__(
        self, app: App, limits: ServerLimits, http1: ServerState, max_streams: int = 128
    ) -> None:
        self.app = app
        self.limits = limits
        self.http1 = http1
        self.max_streams = max_streams
        self.connections: set[H2ServerConnection] = set()
        self.draining = False
        self._sweeper: asyncio.TimerHandle | None = None

    def protocol_factory(self) -> Sniffer:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)
        return Sniffer(self)

    def h2_connection(self) -> H2ServerConnection:
        return H2ServerConnection(self)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle = self.limits.idle_timeout
        for conn in list(self.connections):
            if conn.active == 0 and not conn.streams and now - conn.idle_since > idle:
                conn.drain()
        self._sweeper = loop.call_later(1.0, self._sweep)

    def start_drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.drain()

    def busy(self) -> bool:
        return any(conn.busy for conn in self.connections)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class Sniffer(asyncio.Protocol):
    """A new connection until it has said which protocol it speaks: ALPN's choice on TLS, the
    HTTP/2 preface (or its absence) in the first bytes on cleartext. Then it hands the
    transport to that protocol's connection and is gone."""

    def __init__(self, listener: H2Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # a client that connects and says nothing is closed after the header timeout, as the
        # HTTP/1.1 server would
        self.timer = asyncio.get_running_loop().call_later(
            self.listener.limits.header_timeout, transport.close
        )
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            if ssl_object.selected_alpn_protocol() == "h2":
                self._switch(self.listener.h2_connection())
            else:
                self._switch(self.listener.http1.protocol_factory())

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data
        if buf[:24] == PREFACE:
            self.buffer = buf
            self._switch(self.listener.h2_connection())
        elif len(buf) < 24 and PREFACE.startswith(buf):
            self.buffer = buf  # a preface in pieces: wait for the rest
        else:
            self.buffer = buf
            self._switch(self.listener.http1.protocol_factory())

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _switch(self, proto: asyncio.Protocol) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        assert transport is not None
        transport.set_protocol(proto)
        proto.connection_made(transport)
        buf = self.buffer
        self.buffer = b""
        if buf:
            proto.data_received(buf)
