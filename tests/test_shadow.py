"""Shadowing end to end: what a shadow copy is, which requests get one, and how each is counted.

Everything runs over real loopback sockets: a real proxy subprocess (``ProxyProcess``), a real
primary backend and real shadow backends (``RecordingBackend``, h11-based, so they share no code
with the proxy they judge). Assertions compare what the primary received with what each shadow
received, byte for byte, minus the documented mutations (docs/shadowing.md).

No test sleeps and hopes. Before asserting that a copy did *not* arrive, a test waits until the
proxy has accounted for every request of the route in ``shadowlane_shadow_requests_total``
(every request ends in exactly one terminal outcome, and ``ok`` is only counted once the shadow
answered, so by then every copy that will ever arrive has arrived).
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from support import metrics
from support.backend import (
    Recorded,
    RecordingBackend,
    Reply,
    dead_port,
    echo_reply,
    pattern_bytes,
)
from support.metrics import SHADOW_TERMINAL, outcomes
from support.proxy import ProxyProcess, read_http_response
from support.wait import wait_until

T = 5.0  # client timeout for every request in this file
MARKER = "x-shadowlane-shadow"


# ----------------------------------------------------------------------------------------------
# Backends that remember when each request arrived


class TimedBackend(RecordingBackend):
    """A RecordingBackend whose handler also notes the arrival time of every request.

    The handler runs when the whole request has been read, so ``arrivals`` holds
    ``(time.monotonic(), request)``; test and servers share one clock (one process).
    """

    def __init__(self, reply: Callable[[Recorded], Reply]) -> None:
        self.arrivals: list[tuple[float, Recorded]] = []
        self._arrivals_lock = threading.Lock()
        self._reply = reply
        super().__init__(self._handle)

    def _handle(self, rec: Recorded) -> Reply:
        with self._arrivals_lock:
            self.arrivals.append((time.monotonic(), rec))
        return self._reply(rec)

    def arrival_of(self, pred: Callable[[Recorded], bool]) -> float:
        with self._arrivals_lock:
            times = [t for t, r in self.arrivals if pred(r)]
        assert len(times) == 1, f"expected one matching arrival, got {len(times)}"
        return times[0]


def primary_reply(rec: Recorded) -> Reply:
    """Echo, with ``x-test-status`` and ``x-test-delay`` (seconds) honoured."""
    status = int(rec.header("x-test-status") or 200)
    reply = echo_reply(rec, status)
    reply.headers.append(("X-Answered-By", "primary"))
    reply.delay = float(rec.header("x-test-delay") or 0)
    return reply


def shadow_reply(rec: Recorded) -> Reply:
    """A shadow answers differently from the primary, so a mix-up would show at the client."""
    return Reply(status=202, headers=[("X-Answered-By", "shadow")], body=b"shadow says hi")


# ----------------------------------------------------------------------------------------------
# Clients and metrics


def snapshot(proxy: ProxyProcess, route: str, target: str) -> dict[str, float]:
    """The outcome counts now, to subtract later (tests share a proxy; counters only grow).
    Every outcome series must exist: the proxy declares a pair's series all at once."""
    return outcomes(proxy, route, target, complete=True)


def settle(
    proxy: ProxyProcess,
    route: str,
    target: str,
    n: int,
    since: dict[str, float] | None = None,
    timeout: float = 10.0,
) -> dict[str, float]:
    """:func:`support.metrics.settle` with every outcome series required, as in
    :func:`snapshot`."""
    return metrics.settle(proxy, route, target, n, since, timeout, complete=True)


class Client:
    """One keep-alive connection to the proxy (optionally from a chosen loopback address)."""

    def __init__(self, proxy: ProxyProcess, source_ip: str | None = None) -> None:
        src = (source_ip, 0) if source_ip else None
        self.conn = http.client.HTTPConnection(
            proxy.host, proxy.port, timeout=T, source_address=src
        )

    def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, http.client.HTTPResponse]:
        self.conn.request(method, target, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, data, resp

    def close(self) -> None:
        self.conn.close()


def fire(
    proxy: ProxyProcess,
    reqs: Sequence[tuple[str, str, bytes | None, dict[str, str]]],
    conns: int = 4,
) -> list[int]:
    """Send ``(method, target, body, headers)`` requests over ``conns`` keep-alive connections
    in parallel; returns the statuses in request order."""
    statuses = [0] * len(reqs)

    def worker(k: int) -> None:
        c = Client(proxy)
        try:
            for i in range(k, len(reqs), conns):
                method, target, body, headers = reqs[i]
                statuses[i] = c.request(method, target, body, headers)[0]
        finally:
            c.close()

    with ThreadPoolExecutor(conns) as pool:
        list(pool.map(worker, range(conns)))
    return statuses


def raw(proxy: ProxyProcess, data: bytes) -> tuple[int, bytes]:
    """Send one raw request on a fresh connection; (status, body) of the answer."""
    with socket.create_connection((proxy.host, proxy.port), timeout=T) as sock:
        sock.sendall(data)
        resp = read_http_response(sock, timeout=T)
        return resp.status, resp.body


def only(recs: list[Recorded], pred: Callable[[Recorded], bool]) -> Recorded:
    found = [r for r in recs if pred(r)]
    assert len(found) == 1, f"expected exactly one matching request, got {len(found)}"
    return found[0]


def copies(shadow: RecordingBackend, route: str) -> list[Recorded]:
    """The copies a shadow received from one route (the marker names the route)."""
    return [r for r in shadow.requests if r.header(MARKER) == route]


def sigma_bound(n: int, p: float, sigmas: float = 4.5) -> float:
    """Half-width of the acceptance band for a Binomial(n, p) count."""
    return sigmas * math.sqrt(n * p * (1 - p))


# ----------------------------------------------------------------------------------------------
# Header comparison: the copy is the primary's request minus the documented mutations

FRAMING = {"content-length", "transfer-encoding"}


def lower(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in headers]


def assert_copy_of(
    primary: Recorded,
    copy: Recorded,
    route: str,
    *,
    host: str,
    removed: Sequence[str] = (),
    set_: dict[str, str] | None = None,
    target: str | None = None,
) -> None:
    """``copy`` is ``primary`` with: Host ``host``, ``removed`` gone, ``set_`` set, the marker
    added, the body framed by Content-Length; method, target (or ``target``) and body equal."""
    set_ = set_ or {}
    assert copy.method == primary.method
    assert copy.target == (target if target is not None else primary.target)
    assert copy.body == primary.body
    # framing: the copy has all its bytes, so Content-Length, never chunked
    assert copy.header_values("transfer-encoding") == []
    if copy.body or copy.method in ("POST", "PUT", "PATCH"):
        assert copy.header_values("content-length") == [str(len(copy.body))]
    else:
        assert copy.header_values("content-length") in ([], ["0"])
    # the marker: exactly once, naming the route
    assert copy.header_values(MARKER) == [route]
    # every other header in the primary's order, Host mutated, removed ones gone, set ones set
    drop = FRAMING | set(removed) | set(set_) | {MARKER}
    expected = [(k, host if k == "host" else v) for k, v in lower(primary.headers) if k not in drop]
    got = [(k, v) for k, v in lower(copy.headers) if k not in FRAMING | set(set_) | {MARKER}]
    assert got == expected
    for name, value in set_.items():
        assert copy.header_values(name) == [value]
    for name in removed:
        assert copy.header_values(name) == []


# ----------------------------------------------------------------------------------------------
# Fixtures: one primary, three shadows, one proxy with a route per feature


@pytest.fixture(scope="module")
def primary() -> Iterator[TimedBackend]:
    b = TimedBackend(primary_reply)
    with b:
        yield b
    assert b.errors == []


def _shadow_backend() -> Iterator[TimedBackend]:
    b = TimedBackend(shadow_reply)
    with b:
        yield b
    assert b.errors == []


sa = pytest.fixture(scope="module", name="sa")(_shadow_backend)
sb = pytest.fixture(scope="module", name="sb")(_shadow_backend)
sc = pytest.fixture(scope="module", name="sc")(_shadow_backend)


def route(name: str, prefix: str, shadows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"path_prefix": prefix, **extra.pop("match", {})},
        "backend": "primary",
        "shadows": shadows,
        **extra,
    }


@pytest.fixture(scope="module")
def px(
    primary: TimedBackend, sa: TimedBackend, sb: TimedBackend, sc: TimedBackend
) -> Iterator[ProxyProcess]:
    routes = [
        route("exact", "/exact/", [{"backend": "sa"}]),
        route("nosuffix", "/nosuffix/", [{"backend": "sa", "host_suffix": ""}]),
        route("hostbackend", "/hostbackend/", [{"backend": "sa", "host": "backend"}]),
        route("hostexplicit", "/hostexplicit/", [{"backend": "sa", "host": "search-v2.internal"}]),
        route(
            "hdrs",
            "/hdrs/",
            [
                {
                    "backend": "sa",
                    "headers": {
                        "set": {"x-env": "shadow", "x-tenant": "beta"},
                        "remove": ["authorization", "Cookie"],
                    },
                }
            ],
        ),
        route(
            "rewrite",
            "/v1/",
            [{"backend": "sa", "rewrite_path": {"regex": "^/v1/(.*)$", "replacement": r"/v2/\1"}}],
        ),
        route(
            "writes",
            "/writes/",
            [{"backend": "sa", "match": {"methods": ["POST", "PUT", "PATCH", "DELETE"]}}],
        ),
        route("es", "/_", [{"backend": "sa", "match": {"path_prefix": "/_bulk"}}]),
        route("hm", "/hm/", [{"backend": "sa", "match": {"headers": {"X-Canary": "yes"}}}]),
        route("after", "/after/", [{"backend": "sa", "send": "after_response"}]),
        route("withreq", "/withreq/", [{"backend": "sa"}]),
        route("only2xx", "/only2xx/", [{"backend": "sa", "only_if_primary": "2xx"}]),
        route("maxbody", "/maxbody/", [{"backend": "sa", "max_body": "1KiB"}]),
        route(
            "multi",
            "/multi/",
            [
                {"backend": "sa", "percent": 100},
                {"backend": "sb", "percent": 50},
                {"backend": "sc", "percent": 0},
            ],
        ),
        route("loop", "/loop/", [{"backend": "sa"}, {"backend": "sb"}]),
        route("pct", "/pct/", [{"backend": "sb", "percent": 30}]),
        route(
            "acct",
            "/acct/",
            [
                {"backend": "sa", "percent": 50},
                {"backend": "sb", "max_body": 16},
                {"backend": "dead"},
            ],
        ),
        route(
            "pdown",
            "/pdown/",
            [{"backend": "sa"}, {"backend": "sb", "send": "after_response"}],
            backend="dead",
        ),
        route("hostpair", "/hostpair/", [{"backend": "pair", "host": "backend"}]),
        route(
            "abort",
            "/abort/",
            [{"backend": "sa"}, {"backend": "sb", "send": "after_response"}],
        ),
    ]
    config = {
        "limits": {"drain_timeout": "1s"},
        "backends": {
            "primary": {"endpoints": [primary.url]},
            "sa": {"endpoints": [sa.url]},
            "sb": {"endpoints": [sb.url]},
            "sc": {"endpoints": [sc.url]},
            "pair": {"endpoints": [sa.url, sb.url]},
            "dead": {"endpoints": [f"http://127.0.0.1:{dead_port()}"], "connect_timeout": "1s"},
        },
        "routes": routes,
    }
    with ProxyProcess(config) as proxy:
        yield proxy
        stderr = proxy.stderr_text()
    assert "Traceback" not in stderr, stderr


# ----------------------------------------------------------------------------------------------
# What a copy is


def test_copy_is_exact_content_length_body(
    px: ProxyProcess, primary: TimedBackend, sa: TimedBackend
) -> None:
    body = b'{"op": "update", "bytes": "\\u00ff"}\n' + pattern_bytes(3000)
    req = (
        b"PATCH /exact/a%20b/c;p=1/tok-cl?x=1&y=%2F&x=2&empty= HTTP/1.1\r\n"
        b"Host: api.example.com:8080\r\n"
        b"User-Agent: shadow-test/1\r\n"
        b"X-Mixed-Case: Keep This Value\r\n"
        b"X-Dup: one\r\n"
        b"X-Dup: two\r\n"
        b"Accept: application/json\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"\r\n" + body
    )
    snap = snapshot(px, "exact", "sa")
    status, answer = raw(px, req)
    # the client got the primary's answer, not the shadow's
    assert status == 200
    echoed = json.loads(answer)
    assert echoed["target"] == "/exact/a%20b/c;p=1/tok-cl?x=1&y=%2F&x=2&empty="
    assert echoed["body_len"] == len(body)

    settle(px, "exact", "sa", 1, snap)
    p = only(primary.requests, lambda r: "tok-cl" in r.target)
    c = only(copies(sa, "exact"), lambda r: "tok-cl" in r.target)
    assert c.target == "/exact/a%20b/c;p=1/tok-cl?x=1&y=%2F&x=2&empty="
    assert c.header_values("x-dup") == ["one", "two"]
    assert c.header("x-mixed-case") == "Keep This Value"
    # Host gets "-shadow" before the port (Envoy's form); X-Forwarded-Host keeps the original
    assert_copy_of(p, c, "exact", host="api.example.com-shadow:8080")
    assert c.header("x-forwarded-host") == "api.example.com:8080"


def test_copy_of_chunked_body_is_whole_and_content_length_framed(
    px: ProxyProcess, primary: TimedBackend, sa: TimedBackend
) -> None:
    parts = [b"first-part;", pattern_bytes(5000), b"", b"last"]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(x), x) for x in parts if x) + b"0\r\n\r\n"
    req = (
        b"POST /exact/tok-chunked HTTP/1.1\r\n"
        b"Host: api.example.com\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"X-Request-Id: rid-chunked-1\r\n"
        b"\r\n" + chunked
    )
    snap = snapshot(px, "exact", "sa")
    status, _ = raw(px, req)
    assert status == 200
    settle(px, "exact", "sa", 1, snap)
    p = only(primary.requests, lambda r: "tok-chunked" in r.target)
    c = only(copies(sa, "exact"), lambda r: "tok-chunked" in r.target)
    whole = b"".join(parts)
    assert p.body == whole and c.body == whole
    assert c.header("content-length") == str(len(whole))
    # no port in Host: the suffix goes at the end
    assert_copy_of(p, c, "exact", host="api.example.com-shadow")
    assert p.header("x-request-id") == c.header("x-request-id") == "rid-chunked-1"


def test_generated_request_id_is_the_same_on_primary_and_copy(
    px: ProxyProcess, primary: TimedBackend, sa: TimedBackend
) -> None:
    """No X-Request-Id from the client: the proxy makes one, and the copy must carry the same."""
    snap = snapshot(px, "withreq", "sa")
    c = Client(px)
    try:
        for i in range(3):
            assert c.request("GET", f"/withreq/tok-rid-{i}")[0] == 200
    finally:
        c.close()
    settle(px, "withreq", "sa", 3, snap)
    for i in range(3):
        tok = f"tok-rid-{i}"
        p = only(primary.requests, lambda r, tok=tok: r.target.endswith(tok))
        cp = only(copies(sa, "withreq"), lambda r, tok=tok: r.target.endswith(tok))
        rid = p.header("x-request-id")
        assert rid, "the proxy did not add an X-Request-Id"
        assert cp.header_values("x-request-id") == [rid]


@pytest.mark.parametrize(
    ("route_name", "prefix", "host_in", "host_out"),
    [
        ("exact", "/exact/", "api.example.com:8080", "api.example.com-shadow:8080"),
        ("exact", "/exact/", "api.example.com", "api.example.com-shadow"),
        ("nosuffix", "/nosuffix/", "api.example.com:8080", "api.example.com:8080"),
        ("hostexplicit", "/hostexplicit/", "api.example.com", "search-v2.internal"),
        ("hostbackend", "/hostbackend/", "api.example.com", "SA_AUTHORITY"),
    ],
)
def test_host_mutations(
    px: ProxyProcess,
    primary: TimedBackend,
    sa: TimedBackend,
    route_name: str,
    prefix: str,
    host_in: str,
    host_out: str,
) -> None:
    host_out = host_out.replace("SA_AUTHORITY", f"127.0.0.1:{sa.port}")
    tok = f"tok-host-{host_in}-{route_name}"
    snap = snapshot(px, route_name, "sa")
    c = Client(px)
    try:
        status, _, _ = c.request("GET", f"{prefix}{tok}", headers={"Host": host_in})
    finally:
        c.close()
    assert status == 200
    settle(px, route_name, "sa", 1, snap)
    p = only(primary.requests, lambda r: r.target.endswith(tok))
    cp = only(copies(sa, route_name), lambda r: r.target.endswith(tok))
    assert p.header("host") == host_in  # the primary's Host is untouched
    assert_copy_of(p, cp, route_name, host=host_out)


def test_header_set_and_remove(px: ProxyProcess, primary: TimedBackend, sa: TimedBackend) -> None:
    headers = {
        "Authorization": "Bearer secret-token",
        "Cookie": "session=abc; uid=7",
        "X-Tenant": "acme",
        "X-Keep": "yes",
    }
    snap = snapshot(px, "hdrs", "sa")
    c = Client(px)
    try:
        assert c.request("POST", "/hdrs/tok-hdrs", b"payload", headers)[0] == 200
    finally:
        c.close()
    settle(px, "hdrs", "sa", 1, snap)
    p = only(primary.requests, lambda r: r.target.endswith("tok-hdrs"))
    cp = only(copies(sa, "hdrs"), lambda r: r.target.endswith("tok-hdrs"))
    # the primary keeps everything
    assert p.header("authorization") == "Bearer secret-token"
    assert p.header("cookie") == "session=abc; uid=7"
    assert p.header("x-tenant") == "acme"
    assert_copy_of(
        p,
        cp,
        "hdrs",
        host=f"127.0.0.1-shadow:{px.port}",
        removed=["authorization", "cookie"],
        set_={"x-env": "shadow", "x-tenant": "beta"},
    )
    assert cp.header("x-keep") == "yes"


def test_rewrite_path_keeps_query(
    px: ProxyProcess, primary: TimedBackend, sa: TimedBackend
) -> None:
    snap = snapshot(px, "rewrite", "sa")
    c = Client(px)
    try:
        assert c.request("GET", "/v1/items/42/tok-rw?q=a%20b&x=1&x=2")[0] == 200
        assert c.request("GET", "/v1/tok-rw2")[0] == 200
    finally:
        c.close()
    settle(px, "rewrite", "sa", 2, snap)
    p = only(primary.requests, lambda r: "tok-rw?" in r.target)
    assert p.target == "/v1/items/42/tok-rw?q=a%20b&x=1&x=2"  # the primary path is untouched
    cp = only(copies(sa, "rewrite"), lambda r: "tok-rw?" in r.target)
    assert_copy_of(
        p,
        cp,
        "rewrite",
        host=f"127.0.0.1-shadow:{px.port}",
        target="/v2/items/42/tok-rw?q=a%20b&x=1&x=2",
    )
    cp2 = only(copies(sa, "rewrite"), lambda r: r.target.endswith("tok-rw2"))
    assert cp2.target == "/v2/tok-rw2"  # no query: no stray "?"


# ----------------------------------------------------------------------------------------------
# Which requests are copied: shadow match


def test_match_methods_only_writes(
    px: ProxyProcess, primary: TimedBackend, sa: TimedBackend
) -> None:
    methods = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "GET"]
    reqs = [
        (m, f"/writes/tok-{m}-{i}", b"x" if m in ("POST", "PUT", "PATCH") else None, {})
        for i, m in enumerate(methods)
    ]
    snap = snapshot(px, "writes", "sa")
    assert fire(px, reqs, conns=1) == [200] * len(reqs)
    writes = ["POST", "PUT", "PATCH", "DELETE"]
    # only matching requests have an outcome at all; wait for those, then look
    settle(px, "writes", "sa", len(writes), snap)
    assert len([r for r in primary.requests if r.path.startswith("/writes/")]) == len(methods)
    got = sorted(r.method for r in copies(sa, "writes"))
    assert got == sorted(writes)


def test_match_path_prefix_bulk(px: ProxyProcess, primary: TimedBackend, sa: TimedBackend) -> None:
    reqs = [
        ("POST", "/_bulk", b'{"index":{}}\n{"a":1}\n', {"Content-Type": "application/x-ndjson"}),
        ("GET", "/_search?q=a", None, {}),
        ("POST", "/_bulk?refresh=wait_for", b'{"index":{}}\n{"a":2}\n', {}),
        ("POST", "/_search", b'{"query":{}}', {}),
        ("PUT", "/_doc/1", b"{}", {}),
    ]
    snap = snapshot(px, "es", "sa")
    assert fire(px, reqs, conns=1) == [200] * len(reqs)
    settle(px, "es", "sa", 2, snap)
    got = sorted((r.method, r.target, r.body) for r in copies(sa, "es"))
    assert got == [
        ("POST", "/_bulk", b'{"index":{}}\n{"a":1}\n'),
        ("POST", "/_bulk?refresh=wait_for", b'{"index":{}}\n{"a":2}\n'),
    ]


def test_match_headers(px: ProxyProcess, sa: TimedBackend) -> None:
    reqs: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        ("GET", "/hm/tok-yes", None, {"X-Canary": "yes"}),
        ("GET", "/hm/tok-no", None, {"X-Canary": "no"}),
        ("GET", "/hm/tok-absent", None, {}),
        ("GET", "/hm/tok-yes-lower", None, {"x-canary": "yes"}),
        ("GET", "/hm/tok-case", None, {"X-Canary": "YES"}),  # values are exact
    ]
    snap = snapshot(px, "hm", "sa")
    assert fire(px, reqs, conns=1) == [200] * len(reqs)
    settle(px, "hm", "sa", 2, snap)
    assert sorted(r.path for r in copies(sa, "hm")) == ["/hm/tok-yes", "/hm/tok-yes-lower"]


# ----------------------------------------------------------------------------------------------
# When copies are sent


def test_after_response_copy_arrives_only_after_primary_answered(
    px: ProxyProcess, primary: TimedBackend, sa: TimedBackend
) -> None:
    delay = 0.3
    snaps = {name: snapshot(px, name, "sa") for name in ("after", "withreq")}
    c = Client(px)
    try:
        for name in ("after", "withreq"):
            t0 = time.monotonic()
            status, _, _ = c.request(
                "POST", f"/{name}/tok-timing", b"body", {"X-Test-Delay": str(delay)}
            )
            assert status == 200
            assert time.monotonic() - t0 >= delay  # the primary really took its time
    finally:
        c.close()
    for name, snap in snaps.items():
        settle(px, name, "sa", 1, snap)
    for name, after in (("after", True), ("withreq", False)):
        path = f"/{name}/tok-timing"
        t_primary = primary.arrival_of(lambda r, path=path: r.path == path)
        t_copy = sa.arrival_of(lambda r, path=path: r.path == path)
        if after:
            # the primary answered at t_primary + delay; the copy must not arrive before that
            assert t_copy >= t_primary + delay, t_copy - t_primary
        else:
            # control: with_request (the default) sends the copy while the primary works
            wait_until(lambda path=path: any(r.path == path for r in sa.requests), T, "copy")
            assert t_copy < t_primary + delay, t_copy - t_primary


def test_only_if_primary_2xx(px: ProxyProcess, primary: TimedBackend, sa: TimedBackend) -> None:
    reqs = [
        ("PUT", "/only2xx/tok-500", b"a", {"X-Test-Status": "500"}),
        ("PUT", "/only2xx/tok-404", b"b", {"X-Test-Status": "404"}),
        ("PUT", "/only2xx/tok-200", b"c", {}),
        ("PUT", "/only2xx/tok-201", b"d", {"X-Test-Status": "201"}),
        ("PUT", "/only2xx/tok-302", b"e", {"X-Test-Status": "302"}),
    ]
    snap = snapshot(px, "only2xx", "sa")
    assert fire(px, reqs, conns=1) == [500, 404, 200, 201, 302]
    got = settle(px, "only2xx", "sa", len(reqs), snap)
    assert got["skipped_status"] == 3
    assert got["ok"] == 2
    assert sorted(r.path for r in copies(sa, "only2xx")) == ["/only2xx/tok-200", "/only2xx/tok-201"]
    # the primary got them all
    assert len([r for r in primary.requests if r.path.startswith("/only2xx/")]) == len(reqs)


def test_max_body_skips_big_bodies(
    px: ProxyProcess, primary: TimedBackend, sa: TimedBackend
) -> None:
    small, exact, big = b"s" * 100, b"e" * 1024, pattern_bytes(1025)
    chunked_big = pattern_bytes(4000)
    reqs = [
        ("POST", "/maxbody/tok-small", small, {}),
        ("POST", "/maxbody/tok-exact", exact, {}),
        ("POST", "/maxbody/tok-big", big, {}),
    ]
    snap = snapshot(px, "maxbody", "sa")
    assert fire(px, reqs, conns=1) == [200, 200, 200]
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunked_big), chunked_big)
    status, answer = raw(
        px,
        b"POST /maxbody/tok-chunked-big HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + body,
    )
    assert status == 200 and json.loads(answer)["body_len"] == len(chunked_big)
    got = settle(px, "maxbody", "sa", 4, snap)
    assert got["skipped_body"] == 2
    assert got["ok"] == 2
    assert sorted(r.path for r in copies(sa, "maxbody")) == [
        "/maxbody/tok-exact",
        "/maxbody/tok-small",
    ]
    # the primary got every body whole
    seen = {r.path: r.body for r in primary.requests if r.path.startswith("/maxbody/")}
    assert seen["/maxbody/tok-big"] == big
    assert seen["/maxbody/tok-chunked-big"] == chunked_big


# ----------------------------------------------------------------------------------------------
# Sampling


def test_random_percent_within_bounds(px: ProxyProcess, sb: TimedBackend) -> None:
    n, p = 1000, 0.30
    reqs = [("GET", f"/pct/{i}", None, {}) for i in range(n)]
    snap = snapshot(px, "pct", "sb")
    assert fire(px, reqs) == [200] * n
    got = settle(px, "pct", "sb", n, snap)
    sampled = n - got["sampled_out"]
    tol = sigma_bound(n, p)  # 4.5 sigma: about 65 of 1000 (6.5 percentage points)
    assert abs(sampled - n * p) <= tol, f"{sampled} of {n} sampled at {p:.0%}"
    assert got["ok"] == sampled
    received = copies(sb, "pct")
    assert len(received) == sampled
    assert len({r.path for r in received}) == sampled  # each request copied at most once


def test_several_shadows_each_with_own_percent(
    px: ProxyProcess, sa: TimedBackend, sb: TimedBackend, sc: TimedBackend
) -> None:
    n = 400
    reqs = [("POST", f"/multi/{i}", f"body-{i}".encode(), {}) for i in range(n)]
    snaps = {t: snapshot(px, "multi", t) for t in ("sa", "sb", "sc")}
    assert fire(px, reqs) == [200] * n
    a, b, c = (settle(px, "multi", t, n, snaps[t]) for t in ("sa", "sb", "sc"))
    assert a["ok"] == n and a["sampled_out"] == 0
    assert c["sampled_out"] == n and c["ok"] == c["sent"] == 0
    assert abs(b["ok"] - n * 0.5) <= sigma_bound(n, 0.5)
    assert b["ok"] + b["sampled_out"] == n
    assert sorted(r.path for r in copies(sa, "multi")) == sorted(f"/multi/{i}" for i in range(n))
    got_b = copies(sb, "multi")
    assert len(got_b) == b["ok"]
    assert all(r.body == f"body-{r.path.rsplit('/', 1)[1]}".encode() for r in got_b)
    assert copies(sc, "multi") == []


# consistent sampling: two proxies (two processes) with different percents, the same keys

SAMPLE_KINDS = ["header", "cookie", "query", "client_ip"]
N_KEYS = 200


@pytest.fixture(scope="module")
def sampling_shadow() -> Iterator[TimedBackend]:
    yield from _shadow_backend()


def _sampling_config(primary: TimedBackend, shadow: TimedBackend, percent: float) -> dict:
    shadow_of = {
        "header": "header:X-User-Id",
        "cookie": "cookie:uid",
        "query": "query:uid",
        "client_ip": "client_ip",
    }
    return {
        "limits": {"drain_timeout": "1s"},
        "backends": {"primary": {"endpoints": [primary.url]}, "ss": {"endpoints": [shadow.url]}},
        "routes": [
            route(
                f"by-{kind}",
                f"/by-{kind}/",
                [{"backend": "ss", "percent": percent, "sample_by": spec}],
            )
            for kind, spec in shadow_of.items()
        ],
    }


@pytest.fixture(scope="module")
def sampling_proxies(
    primary: TimedBackend, sampling_shadow: TimedBackend
) -> Iterator[dict[float, ProxyProcess]]:
    with (
        ProxyProcess(_sampling_config(primary, sampling_shadow, 10)) as p10,
        ProxyProcess(_sampling_config(primary, sampling_shadow, 20)) as p20,
    ):
        yield {10: p10, 20: p20}


def _key_of(kind: str, rec: Recorded) -> str:
    if kind == "header":
        return rec.header("x-user-id") or ""
    if kind == "cookie":
        return (rec.header("cookie") or "").partition("uid=")[2].partition(";")[0]
    if kind == "query":
        return rec.query.partition("uid=")[2].partition("&")[0]
    return rec.header("x-forwarded-for") or ""


def _send_keyed(proxy: ProxyProcess, kind: str, keys: list[str], repeats: int) -> None:
    def one(k: int) -> None:
        key = keys[k]
        c = Client(proxy, source_ip=key if kind == "client_ip" else None)
        try:
            for rep in range(repeats):
                headers: dict[str, str] = {}
                target = f"/by-{kind}/rep{rep}/k{k}"
                if kind == "header":
                    headers["X-User-Id"] = key
                elif kind == "cookie":
                    headers["Cookie"] = f"theme=dark; uid={key}; lang=en"
                elif kind == "query":
                    target += f"?a={rep}&uid={key}&b=1"
                method = "GET" if rep % 2 == 0 else "POST"
                status, _, _ = c.request(
                    method, target, b"x" if method == "POST" else None, headers
                )
                assert status == 200
        finally:
            c.close()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(len(keys))))


@pytest.mark.parametrize("kind", SAMPLE_KINDS)
def test_consistent_sampling_by_key(
    kind: str, sampling_proxies: dict[float, ProxyProcess], sampling_shadow: TimedBackend
) -> None:
    """Same key, same decision (across repeats, methods and paths); raising the percent only
    adds keys (every key in at 10% is in at 20%, in another process); shares within bounds."""
    if kind == "client_ip":
        # the client address is the key: connect from distinct loopback addresses (127.0.1.x)
        keys = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(N_KEYS)]
    else:
        keys = [f"user-{i:04d}" for i in range(N_KEYS)]
    repeats = 3
    chosen: dict[float, set[str]] = {}
    for percent, proxy in sampling_proxies.items():
        route_name = f"by-{kind}"
        _send_keyed(proxy, kind, keys, repeats)
        got = settle(proxy, route_name, "ss", N_KEYS * repeats)
        port_marker = f"-shadow:{proxy.port}"
        recs = [
            r
            for r in copies(sampling_shadow, route_name)
            if (r.header("host") or "").endswith(port_marker)
        ]
        assert len(recs) == got["ok"]
        per_key: dict[str, int] = {}
        for r in recs:
            key = _key_of(kind, r)
            assert key in keys, key
            per_key[key] = per_key.get(key, 0) + 1
        # all or nothing per key
        partial = {k: v for k, v in per_key.items() if v != repeats}
        assert partial == {}, f"keys sampled only sometimes at {percent}%: {partial}"
        chosen[percent] = set(per_key)
        assert got["sampled_out"] == (N_KEYS - len(per_key)) * repeats
        p = percent / 100
        assert abs(len(per_key) - N_KEYS * p) <= sigma_bound(N_KEYS, p), (
            f"{len(per_key)} of {N_KEYS} keys at {percent}%"
        )
    missing = chosen[10] - chosen[20]
    assert missing == set(), f"keys in at 10% but out at 20%: {sorted(missing)}"


# ----------------------------------------------------------------------------------------------
# Loop detection and accounting


def test_loop_detection(
    px: ProxyProcess, primary: TimedBackend, sa: TimedBackend, sb: TimedBackend
) -> None:
    reqs = [
        ("GET", "/loop/tok-marked", None, {"X-Shadowlane-Shadow": "someroute"}),
        ("POST", "/loop/tok-marked-post", b"b", {"x-shadowlane-shadow": ""}),
        ("GET", "/loop/tok-clean", None, {}),
    ]
    snaps = {t: snapshot(px, "loop", t) for t in ("sa", "sb")}
    assert fire(px, reqs, conns=1) == [200, 200, 200]
    for target in ("sa", "sb"):
        got = settle(px, "loop", target, 3, snaps[target])
        assert got["skipped_loop"] == 2
        assert got["ok"] == 1
    for shadow in (sa, sb):
        assert [r.path for r in copies(shadow, "loop")] == ["/loop/tok-clean"]
        assert [r for r in shadow.requests if "tok-marked" in r.path] == []
    # the primary still got the marked requests, marker and all
    p = only(primary.requests, lambda r: r.path == "/loop/tok-marked")
    assert p.header(MARKER) == "someroute"


def test_outcome_counters_add_up(px: ProxyProcess, sa: TimedBackend, sb: TimedBackend) -> None:
    """Per target, every request of the route ends in exactly one terminal outcome.

    Route `acct`: sa samples 50%; sb has max_body 16 (big bodies skipped); `dead` refuses
    connections (error, fast after the circuit breaker opens). Some requests carry the marker.
    """
    n_plain, n_big, n_loop = 120, 40, 10
    reqs: list[tuple[str, str, bytes | None, dict[str, str]]] = []
    reqs += [("POST", f"/acct/s{i}", b"small", {}) for i in range(n_plain)]
    reqs += [("POST", f"/acct/b{i}", b"B" * 100, {}) for i in range(n_big)]
    reqs += [("GET", f"/acct/l{i}", None, {MARKER: "acct"}) for i in range(n_loop)]
    n = len(reqs)
    snaps = {t: snapshot(px, "acct", t) for t in ("sa", "sb", "dead")}
    assert fire(px, reqs) == [200] * n  # the primary is never affected
    a, b, d = (settle(px, "acct", t, n, snaps[t]) for t in ("sa", "sb", "dead"))
    for got in (a, b, d):
        assert got["skipped_loop"] == n_loop
        assert sum(got[o] for o in SHADOW_TERMINAL) == n
        assert got["timeout"] == got["skipped_status"] == 0
    assert a["dropped"] == b["dropped"] == 0
    # sa: random half of the non-loop requests, all answered
    assert a["sampled_out"] + a["ok"] == n - n_loop
    assert a["sent"] == a["ok"] == len(copies(sa, "acct"))
    assert abs(a["ok"] - (n - n_loop) / 2) <= sigma_bound(n - n_loop, 0.5)
    # sb: every small body copied, every big one skipped
    assert b["skipped_body"] == n_big and b["ok"] == n_plain == b["sent"]
    assert len(copies(sb, "acct")) == n_plain
    # dead: the first copies fail, then the lane's circuit opens and sheds the rest (dropped);
    # none reached a socket
    assert d["error"] + d["dropped"] == n - n_loop and d["error"] >= 5
    assert d["ok"] == 0 and d["sent"] == 0


def test_every_request_is_counted_when_the_primary_is_down(px: ProxyProcess) -> None:
    """The primary refuses connections (502): each request still ends in exactly one terminal
    outcome per shadow, whether the copy goes with the request or after the answer."""
    snaps = {t: snapshot(px, "pdown", t) for t in ("sa", "sb")}
    reqs = [
        ("GET", "/pdown/tok-get", None, {}),
        ("POST", "/pdown/tok-post", b"payload", {}),
    ]
    assert fire(px, reqs, conns=1) == [502, 502]
    for target in ("sb", "sa"):  # after_response first, then with_request
        settle(px, "pdown", target, len(reqs), snaps[target], timeout=5)


def test_with_request_copy_of_a_get_goes_even_when_the_primary_is_down(
    px: ProxyProcess, sa: TimedBackend
) -> None:
    """`send: with_request` starts the copy once the request is read; a GET has nothing more
    to read, so its copy goes whatever becomes of the primary (use only_if_primary to tie the
    copy to the primary's success)."""
    c = Client(px)
    try:
        assert c.request("GET", "/pdown/tok-get-copy")[0] == 502
    finally:
        c.close()
    wait_until(
        lambda: any(r.path == "/pdown/tok-get-copy" for r in copies(sa, "pdown")),
        5,
        "the GET's copy at the shadow",
    )


def test_client_leaving_mid_upload_is_counted(
    px: ProxyProcess, primary: TimedBackend, sa: TimedBackend
) -> None:
    """A client that sends part of its body and vanishes: no copy (there is no whole body),
    but the request is still accounted for, once per shadow."""
    snaps = {t: snapshot(px, "abort", t) for t in ("sa", "sb")}
    before = primary.raw_bytes
    with socket.create_connection((px.host, px.port), timeout=T) as sock:
        head = b"POST /abort/tok-half HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head + b"x" * 10)
        # the partial upload reached the primary (the proxy is relaying the body); then the
        # client vanishes with an abortive close (RST), not a half-close that still wants an
        # answer
        wait_until(lambda: primary.raw_bytes >= before + 10, 5, "the partial upload upstream")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # a whole request after it, on the same route
    c = Client(px)
    try:
        assert c.request("POST", "/abort/tok-whole", b"whole")[0] == 200
    finally:
        c.close()
    for target in ("sb", "sa"):  # after_response first, then with_request
        got = settle(px, "abort", target, 2, snaps[target], timeout=5)
        assert got["ok"] == 1, got
    assert [r.path for r in copies(sa, "abort")] == ["/abort/tok-whole"]


def test_host_backend_names_the_endpoint_each_copy_goes_to(
    px: ProxyProcess, sa: TimedBackend, sb: TimedBackend
) -> None:
    """`host: backend` on a backend with two endpoints: each copy's Host is the host:port of
    the endpoint that receives it, as for any request sent to that endpoint."""
    snap = snapshot(px, "hostpair", "pair")
    reqs = [("GET", f"/hostpair/host-{i}", None, {}) for i in range(4)]
    assert fire(px, reqs, conns=1) == [200] * 4
    settle(px, "hostpair", "pair", 4, snap)
    for shadow in (sa, sb):
        for r in copies(shadow, "hostpair"):
            if r.path.startswith("/hostpair/host-"):
                assert r.header("host") == f"127.0.0.1:{shadow.port}", r.path


def test_copies_round_robin_over_the_shadow_backends_endpoints(
    px: ProxyProcess, sa: TimedBackend, sb: TimedBackend
) -> None:
    """A shadow backend with two endpoints gets its copies round robin, like a primary, over
    kept-alive connections (copies sent one after another need one connection per endpoint)."""
    snap = snapshot(px, "hostpair", "pair")
    n = 10
    c = Client(px)
    try:
        for i in range(n):
            assert c.request("GET", f"/hostpair/rr-{i}")[0] == 200
            # one copy at a time: the next request only after this copy was answered
            settle(px, "hostpair", "pair", i + 1, snap)
    finally:
        c.close()
    got = {
        name: [r for r in copies(shadow, "hostpair") if r.path.startswith("/hostpair/rr-")]
        for name, shadow in (("sa", sa), ("sb", sb))
    }
    assert {name: len(recs) for name, recs in got.items()} == {"sa": n // 2, "sb": n // 2}
    for recs in got.values():
        assert len({r.connection_id for r in recs}) == 1, "a new connection per copy"
