"""How a shadow copy differs from the request the primary got.

Starts from the headers the primary was sent (hop-by-hop removed, X-Forwarded-*, the shared
X-Request-Id), then: the Host gets a suffix (`-shadow` by default, inserted before the port
as Envoy does) or an explicit value, configured headers are removed and set, the marker
`X-Shadowlane-Shadow: <route>` is added (always on a copy, and it cannot be removed), the path
may be rewritten by regex, and the body is framed with Content-Length (the copy has all its
bytes). `shadowlane replay` builds its requests here too (without the marker when it replays
to a URL rather than as a configured shadow).
"""

from __future__ import annotations

import re

from shadowlane.config import ShadowConfig
from shadowlane.wire.headers import serialize_headers
from shadowlane.wire.messages import Headers, Request

MARKER = b"x-shadowlane-shadow"
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


def add_host_suffix(host: bytes, suffix: bytes) -> bytes:
    """`api.example.com:8080` + `-shadow` -> `api.example.com-shadow:8080` (Envoy's form)."""
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] + suffix + host[end + 1 :] if end >= 0 else host + suffix
    name, sep, port = host.rpartition(b":")
    if sep and port.isdigit():
        return name + suffix + b":" + port
    return host + suffix


class CopyBuilder:
    """Precompiled mutations of one shadow; builds the copy's request head."""

    __slots__ = ("_drop", "_host", "_marker", "_rewrite", "_set", "_suffix", "host_is_endpoint")

    def __init__(self, cfg: ShadowConfig, route_name: str, *, marker: bool = True) -> None:
        #: `X-Shadowlane-Shadow: <route>` on every copy; `shadowlane replay --to URL` sends the
        #: recorded request itself, not a shadow's copy, and builds without it
        self._marker: tuple[bytes, bytes] | None = (MARKER, route_name.encode()) if marker else None
        self._set = [(k.encode(), v.encode()) for k, v in cfg.headers.set.items()]
        self._drop = (
            frozenset(k.encode() for k in cfg.headers.remove)
            | frozenset(k for k, _ in self._set)
            | _FRAMING
            | {MARKER}
        )
        self._suffix = cfg.host_suffix.encode()
        self._host: bytes | None = None
        #: `host: backend`: the Host is the authority of the endpoint each copy goes to
        self.host_is_endpoint = cfg.host == "backend"
        if cfg.host is not None and not self.host_is_endpoint:
            self._host = cfg.host.encode()
        self._rewrite: tuple[re.Pattern[str], str] | None = None
        if cfg.rewrite_path is not None:
            self._rewrite = (re.compile(cfg.rewrite_path.regex), cfg.rewrite_path.replacement)

    def target(self, req: Request, target: bytes | None = None) -> bytes:
        """The copy's path and query: the request's (or `target`, a write step's rewrite of
        it), then `rewrite_path`."""
        if self._rewrite is None:
            return req.target if target is None else target
        if target is None:
            path, query = req.path, req.query
        else:
            raw_path, _, raw_query = target.decode("latin-1").partition("?")
            path, query = raw_path, raw_query
        regex, repl = self._rewrite
        path = regex.sub(repl, path, count=1)
        if query:
            return f"{path}?{query}".encode("latin-1")
        return path.encode("latin-1")

    def head(
        self,
        req: Request,
        base: Headers,
        body_len: int,
        endpoint_authority: bytes = b"",
        method: str | None = None,
        target: bytes | None = None,
    ) -> bytes:
        """The copy's request head; `method` and `target` when a write step changed them
        (`POST /i/_doc` sent as `PUT /i/_create/<the primary's id>`)."""
        method = req.method if method is None else method
        drop = self._drop
        host = endpoint_authority if self.host_is_endpoint else self._host
        out: Headers = []
        saw_host = False
        for item in base:
            name = item[0]
            if name in drop:
                continue
            if name == b"host":
                saw_host = True
                if host is not None:
                    out.append((b"host", host))
                elif self._suffix:
                    out.append((b"host", add_host_suffix(item[1], self._suffix)))
                else:
                    out.append(item)
                continue
            out.append(item)
        if not saw_host and host is not None:
            out.append((b"host", host))
        out.extend(self._set)
        if self._marker is not None:
            out.append(self._marker)
        if body_len or method in ("POST", "PUT", "PATCH"):
            out.append((b"content-length", str(body_len).encode()))
        return b"%s %s HTTP/1.1\r\n%s\r\n" % (
            method.encode(),
            self.target(req, target),
            serialize_headers(out),
        )
