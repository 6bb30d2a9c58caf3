"""How the request a backend is sent differs from the one that came in.

A route's `RequestRewrite` changes the request its primary is sent (path, headers, Host), and
a shadow copy starts from that forwarded request (Envoy's order: its mirror runs in the router,
after the route's mutations), then applies the shadow's own `CopyBuilder`.

A shadow copy
Starts from the headers the primary was sent (hop-by-hop removed, X-Forwarded-*, the shared
X-Request-Id), then: the Host gets a suffix (`-shadow` by default, inserted before the port
as Envoy does) or an explicit value, configured headers are removed and set, the marker
`X-Shadowlane-Shadow: <route>` is added (always on a copy, and it cannot be removed), the path
may be rewritten by regex, and the body is framed with Content-Length (the copy has all its
bytes; a streamed copy of a chunked body, `stream_body`, is sent chunked). `shadowlane
replay` builds its requests here too (without the marker when it replays to a URL rather than
as a configured shadow).
"""

from __future__ import annotations

import re

from shadowlane.config import RouteConfig, ShadowConfig
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
        chunked: bool = False,
    ) -> bytes:
        """The copy's request head; `method` and `target` when a write step changed them
        (`POST /i/_doc` sent as `PUT /i/_create/<the primary's id>`). `chunked`: a streamed
        copy of a body whose length is not known yet (`stream_body`), framed as it came."""
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
        if chunked:
            out.append((b"transfer-encoding", b"chunked"))
        elif body_len or method in ("POST", "PUT", "PATCH"):
            out.append((b"content-length", str(body_len).encode()))
        return b"%s %s HTTP/1.1\r\n%s\r\n" % (
            method.encode(),
            self.target(req, target),
            serialize_headers(out),
        )


def _host_name(host: bytes) -> str:
    """`Request.host` of a Host value: lower-cased, the port removed."""
    text = host.decode("latin-1").lower()
    if text.startswith("["):
        return text[: text.find("]") + 1]
    return text.partition(":")[0]


class RequestRewrite:
    """A route's precompiled changes to the request its primary is sent.

    Built once per route in a generation, and only for a route that has some: the proxy tests
    `is None` and otherwise calls `apply` once per request, which returns the forwarded request
    (a new `Request`, so the client's stays as it came, for the access log) and its headers.
    """

    __slots__ = (
        "_add",
        "_drop",
        "_host",
        "_prefix",
        "_regex",
        "_repl",
        "_set",
        "host_is_endpoint",
    )

    def __init__(self, cfg: RouteConfig) -> None:
        heads = cfg.headers
        self._set = [(k.encode(), v.encode()) for k, v in heads.set.items()]
        self._add = [(k.encode(), v.encode()) for k, v in heads.add.items()]
        #: removed first; a set header replaces every value the client sent
        self._drop = frozenset(k.encode() for k in heads.remove) | frozenset(
            k for k, _ in self._set
        )
        #: `host: backend`: the authority of the endpoint the request goes to
        self.host_is_endpoint = cfg.host == "backend"
        self._host: bytes | None = None
        if cfg.host is not None and not self.host_is_endpoint:
            self._host = cfg.host.encode()
        #: `rewrite_path.prefix`: the matched prefix (or whole path), its replacement in _repl
        self._prefix: str | None = None
        self._regex: re.Pattern[str] | None = None
        self._repl = ""
        rw = cfg.rewrite_path
        if rw is not None:
            if rw.prefix is not None:
                matched = cfg.match.path_prefix
                self._prefix = matched if matched is not None else cfg.match.path
                self._repl = rw.prefix
            elif rw.regex is not None and rw.replacement is not None:
                self._regex = re.compile(rw.regex)
                self._repl = rw.replacement

    def path(self, path: str) -> str:
        """The forwarded path: the prefix replaced, or the regex substituted once; a result
        that lost its leading `/` gets it back (a request target must have one)."""
        prefix = self._prefix
        if prefix is not None:
            if not path.startswith(prefix):
                return path
            path = self._repl + path[len(prefix) :]
        elif self._regex is not None:
            path = self._regex.sub(self._repl, path, count=1)
        else:
            return path
        if not path.startswith("/"):
            return "/" + path
        return path

    def apply(self, req: Request, headers: Headers, authority: bytes) -> tuple[Request, Headers]:
        """The forwarded request and its headers, from the client's `req` and the `headers`
        the proxy would forward (hop-by-hop removed, X-Forwarded-*, the request id);
        `authority` is the chosen endpoint's, for `host: backend`."""
        target = req.target
        if self._prefix is not None or self._regex is not None:
            path = self.path(req.path)
            query = req.query
            target = (f"{path}?{query}" if query else path).encode("latin-1")
        host = authority if self.host_is_endpoint else self._host
        drop = self._drop
        out: Headers = []
        for item in headers:
            name = item[0]
            if name in drop:
                continue
            if name == b"host" and host is not None:
                out.append((b"host", host))
                continue
            out.append(item)
        out.extend(self._set)
        out.extend(self._add)
        fwd = Request(
            req.method,
            target,
            req.http_version,
            out,
            req.host if host is None else _host_name(host),
            req.client_addr,
            req.keep_alive,
        )
        fwd.request_id = req.request_id
        return fwd, out
