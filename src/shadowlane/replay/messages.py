"""Recorded HTTP messages, parsed with httptools: what a payload's raw bytes say.

A recorded request is the raw message as it went over the wire: its head, and its body framed
by Content-Length or chunked. Parsing it with a real HTTP parser (the one the server uses)
rather than splitting on CRLF is what makes chunked bodies, odd spacing and binary bodies
replay as they were sent. The parsed request is re-framed when it is sent: the body is whole
in memory, so it goes with a Content-Length, as every shadow copy does (shadow/mutation.py);
the chunk boundaries and trailers of the original are not kept (no server may give them a
meaning, RFC 9112 7.1).

A recorded answer becomes a `Captured`, the comparison engine's type, with its body
de-chunked and cut at the capture limit the target's answers are cut at, so both sides of a
comparison are captured alike.
"""

from __future__ import annotations

import httptools

from shadowlane.compare import Captured
from shadowlane.wire.headers import HOP_BY_HOP, connection_tokens
from shadowlane.wire.messages import Headers, Request

#: request headers never replayed: hop-by-hop ones (the replay's connection is its own) and
#: `expect` (the body goes at once, there is nothing to wait for)
_NOT_REPLAYED = HOP_BY_HOP | {b"expect"}


class Invalid(ValueError):
    """A payload that is not a whole HTTP/1.x request (or answer); says why."""


class _Collect:
    """httptools callbacks: the first message of the bytes fed."""

    __slots__ = ("body", "complete", "headers", "headers_done", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: Headers = []
        self.body: list[bytes] = []
        self.headers_done = False
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class RecordedRequest:
    """One recorded request: the `Request` every layer reads, and its whole body."""

    __slots__ = ("body", "request", "upgrade")

    def __init__(self, request: Request, body: bytes, upgrade: bool) -> None:
        self.request = request
        self.body = body
        #: asked to switch protocols (WebSocket, CONNECT): not replayable as one exchange
        self.upgrade = upgrade

    @property
    def headers(self) -> Headers:
        """The headers to replay: the recorded ones without the hop-by-hop ones."""
        tokens = connection_tokens(self.request.headers)
        return [
            (k, v) for k, v in self.request.headers if k not in _NOT_REPLAYED and k not in tokens
        ]


def _host(headers: Headers) -> str:
    for k, v in headers:
        if k == b"host":
            host = v.decode("latin-1").strip().lower()
            if host.startswith("["):
                return host.partition("]")[0] + "]"
            return host.rpartition(":")[0] if host.count(":") == 1 else host
    return ""


def parse_request(data: bytes) -> RecordedRequest:
    """A recorded request's bytes, parsed; `Invalid` when they are not a whole request."""
    c = _Collect()
    parser = httptools.HttpRequestParser(c)
    upgrade = False
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        upgrade = True
    except httptools.HttpParserError as exc:
        raise Invalid(f"not an HTTP/1.x request: {exc}") from None
    if not c.headers_done:
        raise Invalid("the request head is cut short")
    if not c.complete and not upgrade:
        raise Invalid("the request body is cut short")
    method = parser.get_method().decode("latin-1")
    version = parser.get_http_version()
    request = Request(
        method,
        c.url,
        version,
        c.headers,
        _host(c.headers),
        "",
        parser.should_keep_alive(),
    )
    for k, v in c.headers:
        if k == b"x-request-id":
            request.request_id = v.decode("latin-1")
            break
    return RecordedRequest(request, b"".join(c.body), upgrade or method == "CONNECT")


class _AnswerCollect(_Collect):
    """httptools callbacks for an answer: interim (1xx) messages are dropped as they end, the
    first final one is kept."""

    __slots__ = ("parser", "status")

    def __init__(self) -> None:
        super().__init__()
        self.status = 0
        self.parser: httptools.HttpResponseParser | None = None

    def on_message_begin(self) -> None:
        if self.complete and self.status < 200:
            super().__init__()  # the interim answer is over: start again
            self.status = 0

    def on_headers_complete(self) -> None:
        if not self.headers_done and self.parser is not None:
            self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body.append(body)


def parse_answer(data: bytes, method: str, seconds: float, limit: int) -> Captured:
    """A recorded answer to a `method` request, as the comparison engine takes it.

    Interim (1xx) answers before the final one are skipped; a body without a length ends with
    the record (it ended with the connection); a body cut short, or longer than `limit`, is
    marked `truncated`, as a live capture would be. `Invalid` when there is no status line."""
    c = _AnswerCollect()
    parser = httptools.HttpResponseParser(c)
    c.parser = parser
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        if not c.headers_done:
            raise Invalid(f"not an HTTP/1.x answer: {exc}") from None
    if not c.headers_done:
        raise Invalid("the answer's head is cut short")
    status = c.status
    body = b"".join(c.body)
    framed = any(k in (b"content-length", b"transfer-encoding") for k, _ in c.headers)
    no_body = method == "HEAD" or status in (204, 304) or status < 200
    cut = not c.complete and framed and not no_body
    if len(body) > limit:
        body, cut = body[:limit], True
    return Captured(status, c.headers, b"" if no_body else body, cut, seconds)
