"""Routing through the real proxy: every predicate, first match wins, no match is the proxy's 404.

tests/test_routing.py checks the predicates on hand-built `Request` objects; this file checks
them on what the downstream server builds from bytes on a socket (Host with a port or in upper
case, query strings, header name case, absolute-form targets), and that the matched route's
backend is the one that receives the request. Each route has its own backend, which answers
with its own name.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from support.backend import Recorded, RecordingBackend, Reply
from support.proxy import HttpResponse, ProxyProcess, read_http_response

T = 5.0
LOOPBACK = "127.0.0.1"
DEFAULT_HOST = "test.local"  # matches no host predicate

# (route name, match); every route's backend is named like the route
ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("host", {"host": "api.example.com"}),
    ("wild", {"host": "*.wild.example"}),
    ("path", {"path": "/exact"}),
    ("prefix", {"path_prefix": "/prefix"}),
    ("regex", {"path_regex": "^/items/[0-9]+$"}),
    ("methods", {"path_prefix": "/m", "methods": ["DELETE", "put"]}),
    ("headers", {"path_prefix": "/h", "headers": {"X-Tenant": "acme"}}),
    ("query", {"path_prefix": "/q", "query": {"version": "2"}}),
    ("first-a", {"path_prefix": "/first"}),
    ("first-b", {"path_prefix": "/first/more"}),  # never reached: first-a matches first
    (
        "all",
        {
            "path_prefix": "/all",
            "methods": ["POST"],
            "headers": {"x-user": "u1"},
            "query": {"debug": "1"},
        },
    ),
]


@dataclass
class Env:
    proxy: ProxyProcess
    backends: dict[str, RecordingBackend]

    def total(self) -> int:
        return sum(len(b.requests) for b in self.backends.values())


def named(name: str) -> Any:
    def handle(req: Recorded) -> Reply:
        return Reply(headers=[("Content-Type", "text/plain")], body=name.encode())

    return handle


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with contextlib.ExitStack() as stack:
        backends = {name: stack.enter_context(RecordingBackend(named(name))) for name, _ in ROUTES}
        config = {
            "backends": {
                name: {"endpoints": [b.url], "timeout": "5s"} for name, b in backends.items()
            },
            "routes": [{"name": name, "match": match, "backend": name} for name, match in ROUTES],
        }
        proxy = stack.enter_context(ProxyProcess(config))
        yield Env(proxy, backends)
        for b in backends.values():
            assert b.errors == [], f"RecordingBackend raised: {b.errors!r}"


def send(
    env: Env,
    target: str,
    *,
    method: str = "GET",
    host: str | None = DEFAULT_HOST,
    headers: list[tuple[str, str]] | None = None,
    version: str = "1.1",
) -> HttpResponse:
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers or []]
    if method in ("POST", "PUT"):
        lines.append("Content-Length: 0")
    with socket.create_connection((LOOPBACK, env.proxy.port), timeout=T) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return read_http_response(sock, method, timeout=T)


def assert_routed(env: Env, expected: str, target: str, **kw: Any) -> None:
    """The request is answered by `expected`'s backend, and only that backend received it."""
    before = {name: len(b.requests) for name, b in env.backends.items()}
    resp = send(env, target, **kw)
    assert resp.status == 200, (resp.status, resp.body)
    assert resp.body.decode() == expected, f"{target} {kw}: routed to {resp.body.decode()!r}"
    after = {name: len(b.requests) for name, b in env.backends.items()}
    moved = {name for name in after if after[name] != before[name]}
    assert moved == {expected}, moved
    assert env.backends[expected].requests[-1].target == _origin(target)


def _origin(target: str) -> str:
    if target.startswith("http://"):
        return "/" + target.split("/", 3)[3]
    return target


def assert_not_routed(env: Env, target: str, **kw: Any) -> None:
    """The proxy answers 404 itself, and no backend ever sees the request. A barrier request
    to a known route afterwards proves nothing else was forwarded in the meantime."""
    before = env.total()
    resp = send(env, target, **kw)
    assert resp.status == 404, (resp.status, resp.body, f"{target} {kw}")
    assert (resp.header("content-type") or "").startswith("text/plain"), resp.headers
    barrier = f"/exact?barrier={uuid.uuid4().hex}"
    assert send(env, barrier).status == 200
    env.backends["path"].wait_for_requests(1)
    assert env.total() == before + 1, "a request that matched no route reached a backend"
    assert env.backends["path"].requests[-1].target == barrier


# -- each predicate -----------------------------------------------------------------------------


def test_host_exact(env: Env) -> None:
    assert_routed(env, "host", "/anything", host="api.example.com")
    assert_routed(env, "host", "/anything", host="API.Example.COM")  # case-insensitive
    assert_routed(env, "host", "/anything", host="api.example.com:8443")  # port not compared
    assert_not_routed(env, "/anything", host="www.example.com")
    assert_not_routed(env, "/anything", host="api.example.com.evil")


def test_host_wildcard(env: Env) -> None:
    assert_routed(env, "wild", "/w", host="a.wild.example")
    assert_routed(env, "wild", "/w", host="a.b.wild.example:80")
    assert_not_routed(env, "/w", host="wild.example")  # needs a label before the suffix
    assert_not_routed(env, "/w", host="notwild.example")


def test_http10_without_host_matches_no_host_route(env: Env) -> None:
    assert_not_routed(env, "/anything", host=None, version="1.0")
    assert_routed(env, "path", "/exact", host=None, version="1.0")


def test_absolute_form_target_routes_by_its_authority(env: Env) -> None:
    """RFC 9112 3.2.2 / 7.2: with an absolute-form target the Host header is ignored in favour
    of the target's authority, so Host cannot be used to steer a request to another route."""
    assert_routed(env, "host", "http://api.example.com/abs", host="api.example.com")
    assert_routed(env, "host", "http://api.example.com/abs", host="other.example")
    assert_not_routed(env, "http://other.example/abs", host="api.example.com")


def test_path_exact(env: Env) -> None:
    assert_routed(env, "path", "/exact")
    assert_routed(env, "path", "/exact?x=1")  # the query is not part of the path
    assert_not_routed(env, "/exact/")
    assert_not_routed(env, "/exactly")
    assert_not_routed(env, "/EXACT")


def test_path_prefix(env: Env) -> None:
    assert_routed(env, "prefix", "/prefix")
    assert_routed(env, "prefix", "/prefix/a/b?c=d")
    assert_routed(env, "prefix", "/prefixed")  # a plain string prefix, as Envoy's
    assert_not_routed(env, "/pre")
    assert_not_routed(env, "/x/prefix")


def test_path_regex(env: Env) -> None:
    assert_routed(env, "regex", "/items/42")
    assert_routed(env, "regex", "/items/42?expand=1")
    assert_not_routed(env, "/items/abc")
    assert_not_routed(env, "/items/42/x")


def test_methods(env: Env) -> None:
    assert_routed(env, "methods", "/m", method="DELETE")
    assert_routed(env, "methods", "/m", method="PUT")  # config said "put": methods are upper
    assert_not_routed(env, "/m", method="GET")
    assert_not_routed(env, "/m", method="POST")


def test_headers(env: Env) -> None:
    assert_routed(env, "headers", "/h", headers=[("X-Tenant", "acme")])
    assert_routed(env, "headers", "/h", headers=[("x-tenant", "acme")])
    assert_routed(env, "headers", "/h", headers=[("X-TENANT", "acme")])  # names: any case
    assert_not_routed(env, "/h", headers=[("X-Tenant", "Acme")])  # values: exact
    assert_not_routed(env, "/h", headers=[("X-Tenant", "acme2")])
    assert_not_routed(env, "/h")


def test_query(env: Env) -> None:
    assert_routed(env, "query", "/q?version=2")
    assert_routed(env, "query", "/q?a=1&version=2&b")
    assert_not_routed(env, "/q?version=3")
    assert_not_routed(env, "/q?version=22")
    assert_not_routed(env, "/q?xversion=2")
    assert_not_routed(env, "/q")


def test_all_predicates_of_a_route_must_hold(env: Env) -> None:
    ok: dict[str, Any] = {"method": "POST", "headers": [("X-User", "u1")]}
    assert_routed(env, "all", "/all?debug=1", **ok)
    assert_not_routed(env, "/all?debug=0", **ok)
    assert_not_routed(env, "/all?debug=1", method="PUT", headers=[("X-User", "u1")])
    assert_not_routed(env, "/all?debug=1", method="POST", headers=[("X-User", "u2")])
    assert_not_routed(env, "/nope?debug=1", **ok)


def test_first_match_wins_in_config_order(env: Env) -> None:
    assert_routed(env, "first-a", "/first/more/x")  # first-b is more specific, but later
    assert_routed(env, "first-a", "/first")
    # a request every route's predicates would accept goes to the first route
    assert_routed(env, "host", "/exact", host="api.example.com")
    assert_routed(env, "host", "/prefix", host="api.example.com")


def test_no_match_is_404_from_the_proxy(env: Env) -> None:
    before = env.total()
    resp = send(env, "/nowhere")
    assert resp.status == 404
    assert b"route" in resp.body.lower(), resp.body  # says why, in a short text body
    assert len(resp.body) < 200
    for method in ("GET", "POST", "DELETE", "OPTIONS", "HEAD"):
        assert_not_routed(env, "/nowhere", method=method)
    assert env.total() == before + 5  # only the five barrier requests
