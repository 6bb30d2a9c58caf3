"""Header rules shared by the downstream server, the proxy and the shadow copies.

Header names travel lower-cased in both directions (as Envoy does for HTTP/1): HTTP/1.1 names
are case-insensitive, and one case saves a `.lower()` per header per hop. Values are forwarded
byte for byte.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from shadowlane.wire.messages import Headers

#: RFC 9110 7.6.1 connection-specific fields plus the legacy ones proxies strip (Go's
#: ReverseProxy list). `expect` is answered by us (100-continue), never forwarded.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: request headers we set ourselves, so the client's copies are dropped first
_REQUEST_REPLACED: frozenset[bytes] = HOP_BY_HOP | {
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
}


#: Connection options that are not header names; skipping them saves a filtering pass on
#: nearly every message, which says `Connection: keep-alive` or `close`
_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close"})


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Header names listed in `Connection` (they are hop-by-hop for this message only)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token and token not in _CONNECTION_OPTIONS:
                    tokens.add(token)
    return frozenset(tokens)


def new_request_id() -> bytes:
    """A random 122-bit id in UUID v4 text form. From the Mersenne Twister, not os.urandom:
    it correlates logs, it is no secret, and a syscall per request is measurable."""
    h = f"{random.getrandbits(128):032x}"
    variant = "89ab"[int(h[16], 16) & 3]  # RFC 9562 variant bits 10xx
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}".encode()


def upstream_request_headers(
    headers: Headers, client_ip: bytes, proto: bytes, default_host: bytes
) -> tuple[Headers, bytes]:
    """Headers to send upstream (hop-by-hop removed, X-Forwarded-* set), and the request id:
    the client's X-Request-Id, or a new one that is added to the headers.

    X-Forwarded-For appends the client address to what the client sent (the usual chain);
    X-Forwarded-Proto and -Host are overwritten because an ingress is the trust boundary: a
    client must not be able to claim it came over https. Host passes through unchanged.
    """
    out: Headers = []
    xff: bytes | None = None
    host: bytes | None = None
    request_id = b""
    has_connection = False
    for item in headers:
        name = item[0]
        if name in _REQUEST_REPLACED:
            if name == b"x-forwarded-for":
                xff = item[1] if xff is None else xff + b", " + item[1]
            elif name == b"connection":
                has_connection = True
            continue
        if name == b"host":
            host = item[1]
        elif name == b"x-request-id" and not request_id:
            request_id = item[1]
        out.append(item)
    out.append((b"x-forwarded-for", client_ip if xff is None else xff + b", " + client_ip))
    out.append((b"x-forwarded-proto", proto))
    if host is None:
        out.append((b"host", default_host))  # an HTTP/1.0 client may omit Host; 1.1 needs one
    elif host:
        out.append((b"x-forwarded-host", host))
    if has_connection:
        extra = connection_tokens(headers)
        if extra:
            out = [h for h in out if h[0] not in extra]
    if not request_id:
        request_id = new_request_id()
        out.append((b"x-request-id", request_id))
    return out, request_id


_RESPONSE_DROPPED: frozenset[bytes] = HOP_BY_HOP | {b"content-length"}


def response_headers(headers: Headers) -> Headers:
    """Upstream response headers minus hop-by-hop ones and Content-Length: the framing is
    redone for each client by `Exchange.start_response`."""
    out = []
    has_connection = False
    for h in headers:
        if h[0] in _RESPONSE_DROPPED:
            if h[0] == b"connection":
                has_connection = True
            continue
        out.append(h)
    if has_connection:
        extra = connection_tokens(headers)
        if extra:
            out = [h for h in out if h[0] not in extra]
    return out


def serialize_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join([name + b": " + value + b"\r\n" for name, value in headers])
