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
