"""Header rules on the primary path, checked on the bytes a real backend and a raw client see:
hop-by-hop headers (both directions), X-Forwarded-*, Host, X-Request-Id."""

from __future__ import annotations

import contextlib
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from shadowlane.wire.headers import response_fields, response_headers, serialize_headers
from support.backend import Recorded, RecordingBackend, Reply, default_handler
from support.proxy import HttpResponse, ProxyProcess, read_http_response

T = 5.0
LOOPBACK = "127.0.0.1"

#: what the backend adds to /hop-response answers: hop-by-hop fields, one named by Connection
RESPONSE_HOP = [
    ("Connection", "X-Bar, keep-alive"),
    ("Keep-Alive", "timeout=5, max=100"),
    ("X-Bar", "hidden"),
    ("Trailer", "X-Checksum"),
    ("Upgrade", "h2c"),
    ("Proxy-Authenticate", 'Basic realm="x"'),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("X-Visible", "yes"),
]
REQUEST_HOP_NAMES = {
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "proxy-authorization",
    "x-foo",
}
RESPONSE_HOP_NAMES = {
    "keep-alive",
    "x-bar",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-connection",
    "te",
}


def handler(req: Recorded) -> Reply:
    if req.path == "/hop-response":
        return Reply(headers=list(RESPONSE_HOP), body=b"ok")
    return default_handler(req)


@dataclass
class Env:
    proxy: ProxyProcess
    backend: RecordingBackend

    @property
    def port(self) -> int:
        return self.proxy.port


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with contextlib.ExitStack() as stack:
        backend = stack.enter_context(RecordingBackend(handler))
        config = {
            "backends": {"b1": {"endpoints": [backend.url], "timeout": "5s"}},
            "routes": [{"name": "all", "match": {}, "backend": "b1"}],
        }
        proxy = stack.enter_context(ProxyProcess(config))
        yield Env(proxy, backend)
        assert backend.errors == [], f"RecordingBackend raised: {backend.errors!r}"


def exchange(port: int, head: str, method: str = "GET") -> HttpResponse:
    """Send a raw request head (lines joined with CRLF) on a new connection; parse the answer."""
    with socket.create_connection((LOOPBACK, port), timeout=T) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n")
        return read_http_response(sock, method, timeout=T)


def forwarded(env: Env, head: str) -> Recorded:
    """Send `head`, expect 200, and return the request as the backend received it. The request
    target must be unique; the record is found by it."""
    target = head.split(" ", 2)[1]
    resp = exchange(env.port, head)
    assert resp.status == 200, (resp.status, resp.body)
    (rec,) = [r for r in env.backend.requests if r.target == target]
    return rec


def uid() -> str:
    return uuid.uuid4().hex[:12]


def connection_tokens(values: list[str]) -> set[str]:
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


# -- hop-by-hop ---------------------------------------------------------------------------------


def test_request_hop_by_hop_headers_removed(env: Env) -> None:
    rec = forwarded(
        env,
        f"GET /hop-{uid()} HTTP/1.1\n"
        "Host: fwd.test\n"
        "Connection: keep-alive, X-Foo\n"
        "Keep-Alive: timeout=5\n"
        "TE: trailers\n"
        "Trailer: X-Checksum\n"
        "Upgrade: websocket\n"
        "Proxy-Connection: keep-alive\n"
        "Proxy-Authorization: Basic Zm9vOmJhcg==\n"
        "X-Foo: secret\n"
        "X-Keep: yes",
    )
    names = {k.lower() for k, _ in rec.headers}
    assert names & REQUEST_HOP_NAMES == set(), rec.headers
    # the proxy may speak for its own upstream connection, never relay the client's options
    assert connection_tokens(rec.header_values("connection")) <= {"keep-alive", "close"}
    assert rec.header("x-keep") == "yes"
    assert "secret" not in repr(rec.headers)


def test_upgrade_request_keeps_the_switch_and_its_non_101_answer_passes(env: Env) -> None:
    """A route tunnels WebSocket by default: the switch (Connection: upgrade, Upgrade) is the
    one hop-by-hop pair asked of the backend as the client asked it, while the client's other
    Connection options are not; a backend that answers without switching is relayed as any
    answer, and the connection closes after it (tests/test_websocket.py has the tunnel)."""
    target = f"/ws-{uid()}"
    resp = exchange(
        env.port,
        f"GET {target} HTTP/1.1\nHost: fwd.test\nConnection: Upgrade, X-Foo\n"
        "Upgrade: websocket\nX-Foo: secret",
    )
    assert resp.status == 200, resp
    assert "close" in connection_tokens(resp.header_values("connection"))
    (rec,) = [r for r in env.backend.requests if r.target == target]
    assert rec.header("upgrade") == "websocket", rec.headers
    assert connection_tokens(rec.header_values("connection")) == {"upgrade"}
    assert rec.header("x-foo") is None


def test_response_hop_by_hop_headers_removed(env: Env) -> None:
    resp = exchange(env.port, "GET /hop-response HTTP/1.1\nHost: fwd.test")
    assert resp.status == 200 and resp.body == b"ok", resp
    names = {k.lower() for k, _ in resp.headers}
    assert names & RESPONSE_HOP_NAMES == set(), resp.headers
    assert connection_tokens(resp.header_values("connection")) <= {"keep-alive", "close"}
    assert resp.header("x-visible") == "yes"


def test_client_connection_close_does_not_close_upstream(env: Env) -> None:
    """`Connection: close` is about the client's connection: the pooled upstream connection
    stays open and serves the next client."""
    a = forwarded(env, f"GET /c1-{uid()} HTTP/1.1\nHost: fwd.test\nConnection: close")
    b = forwarded(env, f"GET /c2-{uid()} HTTP/1.1\nHost: fwd.test\nConnection: close")
    assert a.connection_id == b.connection_id
    assert connection_tokens(a.header_values("connection")) <= {"keep-alive"}


# -- X-Forwarded-* and Host ---------------------------------------------------------------------


def xff_chain(rec: Recorded) -> str:
    return ", ".join(rec.header_values("x-forwarded-for"))


def test_x_forwarded_for_set_when_absent(env: Env) -> None:
    rec = forwarded(env, f"GET /xff-{uid()} HTTP/1.1\nHost: fwd.test")
    assert rec.header_values("x-forwarded-for") == ["127.0.0.1"]


def test_x_forwarded_for_appends_to_existing_chain(env: Env) -> None:
    rec = forwarded(
        env,
        f"GET /xff-{uid()} HTTP/1.1\nHost: fwd.test\nX-Forwarded-For: 203.0.113.7, 198.51.100.2",
    )
    assert xff_chain(rec) == "203.0.113.7, 198.51.100.2, 127.0.0.1"


def test_x_forwarded_for_appends_to_several_headers_in_order(env: Env) -> None:
    rec = forwarded(
        env,
        f"GET /xff-{uid()} HTTP/1.1\nHost: fwd.test\n"
        "X-Forwarded-For: 203.0.113.7\nX-Keep: between\nx-forwarded-for: 198.51.100.2",
    )
    assert xff_chain(rec) == "203.0.113.7, 198.51.100.2, 127.0.0.1"


def test_x_forwarded_proto_and_host_set_and_not_spoofable(env: Env) -> None:
    rec = forwarded(env, f"GET /xfp-{uid()} HTTP/1.1\nHost: Shop.Example:8443")
    assert rec.header_values("x-forwarded-proto") == ["http"]
    assert rec.header_values("x-forwarded-host") == ["Shop.Example:8443"]
    # a client cannot claim https or another host: the ingress is the trust boundary
    rec = forwarded(
        env,
        f"GET /xfp-{uid()} HTTP/1.1\nHost: shop.example\n"
        "X-Forwarded-Proto: https\nX-Forwarded-Host: evil.example",
    )
    assert rec.header_values("x-forwarded-proto") == ["http"]
    assert rec.header_values("x-forwarded-host") == ["shop.example"]


def test_host_passed_through_unchanged(env: Env) -> None:
    rec = forwarded(env, f"GET /host-{uid()} HTTP/1.1\nHost: Shop.Example:8443")
    assert rec.header_values("host") == ["Shop.Example:8443"]


def test_http10_request_without_host_gets_the_backend_authority(env: Env) -> None:
    """The upstream request is HTTP/1.1, which needs a Host."""
    rec = forwarded(env, f"GET /h10-{uid()} HTTP/1.0")
    assert rec.http_version == "1.1"
    assert rec.header_values("host") == [f"127.0.0.1:{env.backend.port}"]


def test_absolute_form_target_authority_becomes_the_host(env: Env) -> None:
    """RFC 9112 3.2.2: the authority of an absolute-form target replaces Host."""
    target = f"/abs-{uid()}"
    resp = exchange(env.port, f"GET http://api.example.com:8080{target} HTTP/1.1\nHost: other")
    assert resp.status == 200, resp
    (rec,) = [r for r in env.backend.requests if r.target == target]
    assert rec.header_values("host") == ["api.example.com:8080"], rec.headers
    assert rec.header_values("x-forwarded-host") == ["api.example.com:8080"], rec.headers


def test_empty_host_is_forwarded_as_one_host_header(env: Env) -> None:
    rec = forwarded(env, f"GET /empty-host-{uid()} HTTP/1.1\nHost:")
    assert len(rec.header_values("host")) == 1, rec.headers


def test_other_headers_forwarded_in_order_with_values_intact(env: Env) -> None:
    rec = forwarded(
        env,
        f"GET /keep-{uid()} HTTP/1.1\nHost: fwd.test\n"
        "X-A: 1\nCookie: a=b; c=d\nX-A: 2\nAccept: */*;q=0.8\nX-Odd:  spaced  value",
    )
    kept = [(k.lower(), v) for k, v in rec.headers if k.lower() in ("x-a", "cookie", "accept")]
    assert kept == [("x-a", "1"), ("cookie", "a=b; c=d"), ("x-a", "2"), ("accept", "*/*;q=0.8")]
    assert rec.header("x-odd") == "spaced  value"


# -- X-Request-Id -------------------------------------------------------------------------------

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def test_request_id_kept_when_sent(env: Env) -> None:
    rec = forwarded(env, f"GET /rid-{uid()} HTTP/1.1\nHost: fwd.test\nX-Request-Id: my-id-123")
    assert rec.header_values("x-request-id") == ["my-id-123"]
    rec = forwarded(env, f"GET /rid-{uid()} HTTP/1.1\nHost: fwd.test\nx-request-ID: Other.ID")
    assert rec.header_values("x-request-id") == ["Other.ID"]


def request_ids(env: Env, n: int) -> list[str]:
    """`n` requests without an id, over one keep-alive connection; the ids the backend saw."""
    prefix = f"/gen-{uid()}-"
    with socket.create_connection((LOOPBACK, env.port), timeout=T) as sock:
        for i in range(n):
            sock.sendall(f"GET {prefix}{i} HTTP/1.1\r\nHost: fwd.test\r\n\r\n".encode())
            assert read_http_response(sock, timeout=T).status == 200
    recs = [r for r in env.backend.requests if r.target.startswith(prefix)]
    assert len(recs) == n
    ids = []
    for r in recs:
        values = r.header_values("x-request-id")
        assert len(values) == 1, r.headers
        ids.append(values[0])
    return ids


def test_request_id_generated_in_uuid_form_and_unique(env: Env) -> None:
    ids = request_ids(env, 200)
    for rid in ids:
        assert UUID_RE.fullmatch(rid), rid
    assert len(set(ids)) == len(ids), "duplicate generated request ids"


def test_generated_request_id_is_a_valid_uuid4(env: Env) -> None:
    """Documented as a UUID v4 (headers.new_request_id): version nibble 4 *and* the RFC 4122
    variant bits (10xx), which is what uuid.UUID(...).version and validators check."""
    bad = [rid for rid in request_ids(env, 50) if uuid.UUID(rid).version != 4]
    assert bad == [], f"{len(bad)}/50 generated ids are not RFC 4122 v4 UUIDs, e.g. {bad[:3]}"


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"content-type", b"text/plain"), (b"content-length", b"3")],
        [(b"connection", b"keep-alive"), (b"x-a", b"1"), (b"keep-alive", b"timeout=5")],
        [(b"connection", b"close"), (b"transfer-encoding", b"chunked"), (b"x-a", b"1")],
        [(b"x-a", b"1"), (b"connection", b"x-a, keep-alive"), (b"x-b", b"2")],
        [(b"connection", b"keep-alive"), (b"connection", b"X-B"), (b"x-b", b"2"), (b"x-c", b"")],
        [(b"connection", b"Keep-Alive"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")],
    ],
)
def test_response_fields_is_the_filtered_serialisation(headers: list[tuple[bytes, bytes]]) -> None:
    """The one-pass response head the proxy writes equals filter-then-serialise, the rule."""
    assert response_fields(headers) == serialize_headers(response_headers(headers))
