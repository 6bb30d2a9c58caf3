"""Header rules shared by the downstream server, the proxy and the shadow copies.

Header names travel lower-cased in both directions (as Envoy does for HTTP/1): HTTP/1.1 names
are case-insensitive, and one case saves a `.lower()` per header per hop. Values are forwarded
byte for byte.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from http import HTTPStatus

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
        if name == b"connection" and value not in _CONNECTION_OPTIONS:
            for token in value.split(b","):
                token = token.strip().lower()
                if token and token not in _CONNECTION_OPTIONS:
                    tokens.add(token)
    return frozenset(tokens)


#: the constant part of this process's request ids (UUID v4 form up to the last group)
_ID_HEAD = b""
_id_counter = 0


def _seed_ids() -> None:
    global _ID_HEAD, _id_counter
    p = f"{random.getrandbits(64):016x}"
    variant = "89ab"[int(p[0], 16) & 3]
    _ID_HEAD = f"{p[:8]}-{p[8:12]}-4{p[13:16]}-{variant}{p[1:4]}-".encode()
    _id_counter = random.getrandbits(40)


def _reseed_after_fork() -> None:
    random.seed()
    _seed_ids()


_seed_ids()
# --workers forks after import: each worker needs its own prefix, or ids would repeat
os.register_at_fork(after_in_child=_reseed_after_fork)


def new_request_id() -> bytes:
    """A request id in UUID v4 form: 62 random bits per process, then a counter, so ids are
    unique without a random draw per request (it correlates logs; it is no secret). Only the
    counter is formatted per request: the rest is fixed at start-up (and after a fork)."""
    global _id_counter
    _id_counter += 1
    return _ID_HEAD + b"%012x" % (_id_counter & 0xFFFFFFFFFFFF)


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


def response_fields(headers: Headers) -> bytes:
    """`serialize_headers(response_headers(headers))` in one pass, without the filtered list
    (once per proxied answer); a `Connection` header naming other headers takes the long way."""
    parts: list[bytes] = []
    for name, value in headers:
        if name in _RESPONSE_DROPPED:
            if name == b"connection" and value not in _CONNECTION_OPTIONS:
                return serialize_headers(response_headers(headers))
            continue
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    return b"".join(parts)


def serialize_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    # one join over the pieces: no intermediate `name: value` bytes object per header
    parts: list[bytes] = []
    for name, value in headers:
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    return b"".join(parts)


#: reason phrases by status, kept for the statuses seen (bounded: a backend's status is any
#: three digits)
_REASONS: dict[int, bytes] = {}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of a status code (`Unknown` for codes without one): what an
    HTTP/1.1 status line says where the answer came without one (HTTP/2 has none) and what a
    recorded answer's status line says. Looked up once per status, then kept."""
    phrase = _REASONS.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b"Unknown"
        if len(_REASONS) < 1024:
            _REASONS[status] = phrase
    return phrase
