"""The verdict on a request head: is it acceptable, and how is its body framed.

`decide_head` is a pure function of the parsed head (method, target, version, headers as
httptools delivers them): no I/O, no event loop, no connection. It returns a `RequestHead` (the
body framing, the Host name, the origin-form target, whether the client waits for
`100 Continue`) or a `Rejection` (the status and the one-line reason the client gets before the
connection closes). The server calls it once per request, from the parser's headers-complete
callback; tests call it directly with header lists (tests/test_request_head.py).

llhttp rejects some heads before this is ever called: two Content-Length headers, one that is
not digits or over 2**64 - 1, Content-Length with Transfer-Encoding, `chunked` twice, a
Transfer-Encoding that does not end in `chunked`. Those rules are repeated here, at the cost of
a branch on requests that carry such a header, so that the verdict is complete on its own and
does not depend on the parser's strictness. `parser_rejection` maps what the parser itself
refuses to the answer.

Keep-alive is llhttp's `should_keep_alive()` (the version and `Connection`; the server closes
after an `Upgrade` request), with one rule added here, `RequestHead.close`: a `close` option in
any Connection header closes the connection after this request (RFC 9112 9.6). llhttp lets
an HTTP/1.0 request's `keep-alive` win over a `close` beside it, and h11 (the framing fuzzer's
reference) does not; a proxy that read one more request than the client's other hops would
is the start of a desynchronised connection.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Final, final

import httptools

from shadowlane.wire.messages import Headers


class Framing(Enum):
    """How the request body is delimited (RFC 9112 6.3)."""

    NONE = "none"  #: no body: neither Content-Length nor Transfer-Encoding
    LENGTH = "content-length"  #: exactly `RequestHead.content_length` bytes (0 is a length)
    CHUNKED = "chunked"  #: chunked transfer coding, the only one accepted


@final
class RequestHead:
    """An accepted head, as the server builds its `Request` and `Exchange` from it."""

    __slots__ = (
        "close",
        "content_length",
        "expect_continue",
        "framing",
        "headers",
        "host",
        "method",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        headers: Headers,
        host: str,
        framing: Framing,
        content_length: int | None,
        expect_continue: bool,
        close: bool = False,
    ) -> None:
        self.method = method
        #: the origin-form target (`/path?query`, or `*`); an absolute-form one is reduced to it
        self.target = target
        #: the headers as received, except that an absolute-form target's authority replaces
        #: any Host header (RFC 9112 3.2.2)
        self.headers = headers
        #: the Host name, lower-cased, without the port; "" when there is none (HTTP/1.0) or
        #: the header is empty
        self.host = host
        self.framing = framing
        #: the declared length with `Framing.LENGTH`, else None
        self.content_length = content_length
        #: the client waits for `100 Continue` before it sends the body (only with a body)
        self.expect_continue = expect_continue
        #: a Connection header names `close`: the connection ends after this request, whatever
        #: else it names
        self.close = close

    def __repr__(self) -> str:
        return (
            f"RequestHead({self.method} {self.target!r} host={self.host!r} "
            f"{self.framing.value} {self.content_length} expect={self.expect_continue})"
        )


@final
class Rejection:
    """A head the server answers itself with `status` and closes: nothing reaches a backend."""

    __slots__ = ("reason", "status")

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"Rejection({self.status}, {self.reason!r})"


# The rejections with a fixed reason: built once, not per bad request.
VERSION_NOT_SUPPORTED: Final = Rejection(505, "HTTP version not supported")
UNSUPPORTED_TRANSFER_ENCODING: Final = Rejection(400, "unsupported transfer-encoding")
DUPLICATE_TRANSFER_ENCODING: Final = Rejection(400, "duplicate Transfer-Encoding header")
DUPLICATE_CONTENT_LENGTH: Final = Rejection(400, "duplicate Content-Length header")
MALFORMED_CONTENT_LENGTH: Final = Rejection(400, "malformed Content-Length header")
LENGTH_AND_CHUNKED: Final = Rejection(400, "both Content-Length and Transfer-Encoding")
UNSUPPORTED_EXPECTATION: Final = Rejection(417, "unsupported expectation")
HEADER_TOO_LARGE: Final = Rejection(431, "request header too large")
CHUNKED_HTTP_10: Final = Rejection(400, "chunked transfer coding in an HTTP/1.0 request")
DUPLICATE_HOST: Final = Rejection(400, "duplicate Host header")
MISSING_HOST: Final = Rejection(400, "missing Host header")
CONNECT_NOT_SUPPORTED: Final = Rejection(501, "CONNECT is not supported")
MALFORMED_TARGET: Final = Rejection(400, "malformed request target")
MALFORMED_HOST: Final = Rejection(400, "malformed Host header")


#: the largest Content-Length llhttp accepts (a uint64); 19 digits never exceed it
_MAX_CONTENT_LENGTH: Final = 2**64 - 1
#: Host header value -> `parse_host` of it, for the valid ones (a memo: the verdict stays pure);
#: Final, so compiled code reaches it as a C static instead of a module-dict lookup
_HOST_CACHE: Final[dict[bytes, str]] = {}


def decide_head(
    method_b: bytes, target: bytes, version: str, headers: Headers, max_header_size: int
) -> RequestHead | Rejection:
    """Accept or reject one request head; the first rule broken decides the answer.

    `headers` are (lower-cased name, value) pairs in arrival order; `max_header_size` bounds
    the target plus every `name: value\\r\\n`. The order of the checks is part of the contract
    (a head with two faults always gets the same answer): the version, then each header in
    order (Transfer-Encoding, Expect), then the size, the framing, Host, the method, the target.
    """
    if version not in ("1.1", "1.0"):
        return VERSION_NOT_SUPPORTED
    method = method_b.decode("ascii")
    size = len(target)
    host: bytes | None = None
    host_count = 0
    content_length: int | None = None
    chunked = False
    expect_continue = False
    close = False
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name == b"host":
            host_count += 1
            host = value
        elif name == b"content-length":
            if content_length is not None:
                return DUPLICATE_CONTENT_LENGTH
            if not value.isdigit():  # llhttp leaves trailing whitespace in: "3 "
                value = value.strip()
                if not value.isdigit():
                    return MALFORMED_CONTENT_LENGTH
            content_length = int(value)
            if len(value) > 19 and content_length > _MAX_CONTENT_LENGTH:
                return MALFORMED_CONTENT_LENGTH  # what llhttp calls an overflow
        elif name == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                return UNSUPPORTED_TRANSFER_ENCODING
            if chunked:
                return DUPLICATE_TRANSFER_ENCODING
            chunked = True
        elif name == b"expect" and version == "1.1":
            # RFC 9110 10.1.1: an HTTP/1.0 client's expectation is ignored
            if value.strip().lower() != b"100-continue":
                return UNSUPPORTED_EXPECTATION
            expect_continue = True
        elif name == b"connection":
            lowered = value.lower()
            if b"close" in lowered:
                for option in lowered.split(b","):
                    if option.strip() == b"close":
                        close = True
    if size > max_header_size:
        return HEADER_TOO_LARGE
    if chunked:
        if content_length is not None:
            return LENGTH_AND_CHUNKED  # RFC 9112 6.1: a request-smuggling shape
        if version == "1.0":
            # RFC 9112 6.1: chunked framing from an HTTP/1.0 client is faulty
            return CHUNKED_HTTP_10
        framing = Framing.CHUNKED
    elif content_length is not None:
        framing = Framing.LENGTH
    else:
        framing = Framing.NONE
    if host_count > 1:
        return DUPLICATE_HOST
    if host_count == 0 and version == "1.1":
        return MISSING_HOST
    if method == "CONNECT":
        return CONNECT_NOT_SUPPORTED
    if not target.startswith(b"/") and target != b"*":
        # absolute form (RFC 9112 3.2.2): the target's authority replaces any Host header
        origin = origin_form(target)
        if origin is None:
            return MALFORMED_TARGET
        target, host = origin
        headers = [h for h in headers if h[0] != b"host"]
        headers.append((b"host", host))
    host_s = ""
    if host:
        host_name = _HOST_CACHE.get(host)
        if host_name is None:
            host_name = parse_host(host)
            if host_name is None:
                return MALFORMED_HOST
            if len(_HOST_CACHE) < 1024:  # a few names repeat on every request
                _HOST_CACHE[host] = host_name
        host_s = host_name
    return RequestHead(
        method,
        target,
        headers,
        host_s,
        framing,
        content_length,
        expect_continue and (chunked or bool(content_length)),
        close,
    )


def parse_host(host: bytes) -> str | None:
    """Host header to a lower-case name without port; None when malformed."""
    h = host.strip().lower()
    if not h or b" " in h or b"/" in h or b"@" in h:
        return None
    if h.startswith(b"["):
        end = h.find(b"]")
        if end < 0:
            return None
        rest = h[end + 1 :]
        if rest and not (rest.startswith(b":") and rest[1:].isdigit()):
            return None
        return h[: end + 1].decode("latin-1")
    name, sep, port = h.partition(b":")
    if sep and not port.isdigit():
        return None
    return name.decode("latin-1")


def origin_form(target: bytes) -> tuple[bytes, bytes] | None:
    """An absolute-form target (`http://host:port/path`) -> (`/path`, `host:port`); None when
    it has no host or does not parse."""
    try:
        # Any, not httptools' stub type: the stub says `bytes` where the parser gives None
        # (no query, no port), and compiled code enforces declared types
        parsed: Any = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return None
    if not parsed.host:
        return None
    out = parsed.path or b"/"
    if parsed.query:
        out += b"?" + parsed.query
    authority = parsed.host if parsed.port is None else b"%s:%d" % (parsed.host, parsed.port)
    return out, authority


def parser_rejection(exc: httptools.HttpParserError) -> Rejection:
    """The answer to a head or body that llhttp refused: 505 for a well-formed but unknown
    version ("HTTP/1.2"), 400 for everything else (a malformed "HTTP/1.10" included)."""
    reason = (str(exc).strip() or "malformed request").splitlines()[0][:200]
    return Rejection(505 if reason.startswith("Invalid HTTP version") else 400, reason)
