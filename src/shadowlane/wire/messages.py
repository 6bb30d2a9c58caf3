"""The message types that cross layer boundaries.

A `Request` is built once by the downstream server from httptools callbacks and then read by
routing (predicates), the proxy (forwarding) and the shadow dispatcher (copies). It is a plain
slotted object, not a dataclass with validation, because one is built per request on the hot path.

Header names are stored lower-cased as bytes, values as received (bytes): forwarding writes bytes,
so keeping bytes avoids an encode/decode round trip per header per request. Routing and compare
read through `header()`, which decodes lazily.
"""

from __future__ import annotations

from urllib.parse import parse_qs

Headers = list[tuple[bytes, bytes]]


class Request:
    """One parsed HTTP/1.x request head (the body streams separately)."""

    __slots__ = (
        "_query_args",
        "client_addr",
        "headers",
        "host",
        "http_version",
        "keep_alive",
        "method",
        "path",
        "query",
        "request_id",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        http_version: str,
        headers: Headers,
        host: str,
        client_addr: str,
        keep_alive: bool,
    ) -> None:
        self.method = method
        #: the request target exactly as received (path and query, percent-encoded)
        self.target = target
        path, _, query = target.partition(b"?")
        #: path as a str (latin-1 decoded, still percent-encoded: routing matches what was sent)
        self.path = path.decode("latin-1")
        #: raw query string without the "?", "" when absent
        self.query = query.decode("latin-1")
        self.http_version = http_version
        self.headers = headers
        #: Host header value, lower-cased, port removed ("" for HTTP/1.0 without Host)
        self.host = host
        self.client_addr = client_addr
        self.keep_alive = keep_alive
        self.request_id = ""
        self._query_args: dict[str, list[str]] | None = None

    def header(self, name: str) -> str | None:
        """First value of header `name` (give it lower-case), or None."""
        key = name.encode("latin-1")
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def query_arg(self, name: str) -> str | None:
        """First value of query parameter `name`, or None; parsed once, on first use."""
        if self._query_args is None:
            self._query_args = parse_qs(self.query, keep_blank_values=True)
        values = self._query_args.get(name)
        return values[0] if values else None

    def cookie(self, name: str) -> str | None:
        """Value of cookie `name` from the Cookie header(s), or None."""
        for k, v in self.headers:
            if k != b"cookie":
                continue
            for part in v.decode("latin-1").split(";"):
                key, sep, value = part.strip().partition("=")
                if sep and key == name:
                    return value
        return None


class Body:
    """A request body read whole, as the chunks it arrived in.

    The primary was written these very chunks as they came; every shadow copy writes them
    again as they are (one writev) rather than one bytes joined from them, which for a
    1 MiB upload was a third user-space copy of it and, while the chunks were still queued
    for the primary, a second MiB pinned per request. Only a reader that parses the body
    (an id-rewriting write plan, ordering keys, a recording) asks for `data()`, which joins
    once and keeps the result, so later readers share it.
    """

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[bytes], size: int) -> None:
        #: the chunks, in order (never empty bytes; empty list for an empty body)
        self.parts = parts
        #: their total length
        self.size = size

    def data(self) -> bytes:
        """The whole body as one bytes (joined on the first call, then kept)."""
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return b""
        whole = b"".join(parts)
        self.parts = [whole]
        return whole

    def prefix(self, limit: int) -> bytes:
        """At most the first `limit` bytes (a report's example), joining only what it needs."""
        parts = self.parts
        if not parts:
            return b""
        first = parts[0]
        if len(first) >= limit or len(parts) == 1:
            return first[:limit]
        taken: list[bytes] = []
        have = 0
        for part in parts:
            taken.append(part)
            have += len(part)
            if have >= limit:
                break
        return b"".join(taken)[:limit]


#: the body of a request without one (shared: `data()` never changes an empty body)
EMPTY_BODY = Body([], 0)


def body_of(data: bytes) -> Body:
    """A body already in one piece (a write plan's rewrite of it, a test's)."""
    return Body([data], len(data)) if data else EMPTY_BODY
