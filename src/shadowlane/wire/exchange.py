"""One request and its response on a downstream connection: the body as it streams in, the
response as the application writes it.

The server (`wire/server.py`) builds an `Exchange` per accepted request head and feeds it the
body; the application subscribes to the body (`set_body_consumer`) and writes the answer
(`start_response`, `send_body`, `end_response`). The response framing for this client
(Content-Length, chunked, or close-delimited for an HTTP/1.0 client) is chosen here, in
`start_response_fields`. The underscored methods and fields (`_feed_body`, `_end_body`,
`_body_lost`, the body callbacks) are the server's side of the exchange, not the application's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shadowlane.wire.headers import serialize_headers
from shadowlane.wire.messages import Headers, Request

#: reason phrases of the statuses the server and the proxy answer themselves
STATUS_TEXT: dict[int, bytes] = {
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
#: status lines by (status, reason): a handful of pairs repeat on every answer
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


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
        "upgrade",
    )

    def __init__(self, conn: Connection, request: Request) -> None:
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
        #: the `Upgrade` header's value (lower-cased) when the parser saw a complete upgrade
        #: request (`Upgrade` named in `Connection`, no body); b"" for every other request
        self.upgrade = b""
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
        # the body can no longer be lost: dropping the callback breaks the exchange <->
        # application cycle, which otherwise kept a finished call and its whole body alive
        # until the cyclic GC ran (measured: ~130 dead 1 MiB uploads held at once)
        self._on_body = self._on_body_end = self.on_body_lost = None
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

    def send_trailers(self, trailers: Headers) -> None:
        """Trailing fields of the answer (gRPC's status): an HTTP/1.1 client gets none, as
        from nginx; an HTTP/2 exchange sends them with the end (`wire.h2_server`)."""

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
        if self.body_done:
            # set after the body ended (a streamed body whole before the call subscribed)
            self.on_body_lost = None
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
            status, STATUS_TEXT.get(status, b"Unknown"), hdrs, len(body), close=close
        )
        self.send_body(body)
        self.end_response()

    def abort(self) -> None:
        """Reset the client connection: a truncated response must never look complete."""
        self.response_done = True
        self.on_abort = self.on_writable = None
        self.conn.abort()


class Connection(asyncio.Protocol):
    """What an exchange needs of the connection it arrived on; `ServerConnection` is the one.

    Declared here, as a concrete base class, so that this module need not import the server
    (which imports this one): no import cycle, and the compiled calls stay direct vtable calls,
    which a Protocol would turn into lookups by name on every request.
    """

    draining: bool

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def pause_reading_for(self, reason: str) -> None:
        raise NotImplementedError

    def resume_reading_for(self, reason: str) -> None:
        raise NotImplementedError

    def _exchange_done(self, ex: Exchange) -> None:
        raise NotImplementedError

    def take_over(self) -> tuple[asyncio.Transport, bytes] | None:
        """Hand the client connection over (after a `101`): the transport, and the bytes the
        client sent after its upgrade request. The connection forgets it; None when it is
        already closed."""
        raise NotImplementedError
