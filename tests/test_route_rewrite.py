"""A route's own request mutations (`rewrite_path`, `headers`, `host`), end to end.

The real proxy process in front of real loopback backends (RecordingBackend): the primary sees
the request as the route rewrote it, a shadow sees that same rewritten request plus its own
mutations (its `-shadow` Host by default), as Envoy mirrors after the route's mutations; the
access log keeps the client's path. Config errors name the key path.
"""

from __future__ import annotations

import asyncio
import http.client
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from support.backend import Recorded, RecordingBackend
from support.configs import backend_entry
from support.metrics import settle
from support.proxy import ProxyProcess, raw_request
from support.wait import wait_until
from support.websocket import WebSocketServer

T = 5.0
MARKER = "x-shadowlane-shadow"


def get(
    proxy: ProxyProcess, target: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> int:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=T)
    try:
        conn.request(method, target, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def config(
    primary: RecordingBackend,
    shadow: RecordingBackend | None,
    route: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    backends = {"p": backend_entry(primary.url)}
    if shadow is not None:
        backends["s"] = backend_entry(shadow.url)
        route = {**route, "shadows": route.get("shadows", [{"backend": "s", "percent": 100}])}
    return {"backends": backends, "routes": [{"name": "r", "backend": "p", **route}], **extra}


def check(path: Path) -> subprocess.CompletedProcess[str]:
    """The real `shadowlane check -c PATH` command."""
    return subprocess.run(
        [sys.executable, "-m", "shadowlane", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def only(recs: list[Recorded]) -> Recorded:
    assert len(recs) == 1, f"expected one request, got {len(recs)}"
    return recs[0]


def test_prefix_rewrite_keeps_the_query_and_the_shadow_copies_the_rewritten_request() -> None:
    with RecordingBackend() as primary, RecordingBackend() as shadow:
        route = {
            "match": {"path_prefix": "/api/v1/"},
            "rewrite_path": {"prefix": "/v2/"},
            "shadows": [{"backend": "s", "percent": 100}],
        }
        with ProxyProcess(config(primary, shadow, route, access_log=True)) as proxy:
            assert get(proxy, "/api/v1/orders/7?expand=items&x=%2F", {"host": "shop.test"}) == 200
            assert get(proxy, "/other") == 404
            settle(proxy, "r", "s", 1)
            got = only(primary.requests)
            assert got.target == "/v2/orders/7?expand=items&x=%2F"
            copy = only(shadow.requests)
            assert copy.target == got.target
            assert got.header("host") == "shop.test"
            assert copy.header("host") == "shop.test-shadow"
            assert copy.header(MARKER) == "r"
            assert copy.header("x-request-id") == got.header("x-request-id")
            # the access log keeps what the client asked for
            lines = wait_until(
                lambda: [x for x in proxy.access_log() if x.get("route") == "r"], T, "log line"
            )
            assert lines[0]["path"] == "/api/v1/orders/7?expand=items&x=%2F"


def test_prefix_rewrite_of_an_exact_path_and_to_the_root() -> None:
    with RecordingBackend() as primary:
        cfg = {
            "backends": {"p": backend_entry(primary.url)},
            "routes": [
                {"name": "exact", "match": {"path": "/login"}, "backend": "p",
                 "rewrite_path": {"prefix": "/auth/session"}},
                {"name": "root", "match": {"path_prefix": "/svc"}, "backend": "p",
                 "rewrite_path": {"prefix": "/"}},
            ],
        }  # fmt: skip
        with ProxyProcess(cfg) as proxy:
            assert get(proxy, "/login?next=/home") == 200
            assert get(proxy, "/svc/items") == 200
            assert get(proxy, "/svc") == 200
            assert [r.target for r in primary.requests] == [
                "/auth/session?next=/home",
                "//items",  # Envoy's prefix_rewrite is a string swap: /svc + /items
                "/",
            ]


def test_regex_rewrite_with_groups_and_the_shadows_own_rewrite_after_it() -> None:
    with RecordingBackend() as primary, RecordingBackend() as shadow:
        route = {
            "match": {"path_regex": "^/users/[0-9]+/"},
            "rewrite_path": {"regex": "^/users/([0-9]+)/(.*)$", "replacement": r"/u/\1/\2"},
            "shadows": [
                {
                    "backend": "s",
                    "percent": 100,
                    # the shadow's own mutation sees the route's result, not the client's path
                    "rewrite_path": {"regex": "^/u/", "replacement": "/shadow-u/"},
                }
            ],
        }
        with ProxyProcess(config(primary, shadow, route)) as proxy:
            assert get(proxy, "/users/42/profile?fields=a,b") == 200
            settle(proxy, "r", "s", 1)
            assert only(primary.requests).target == "/u/42/profile?fields=a,b"
            assert only(shadow.requests).target == "/shadow-u/42/profile?fields=a,b"


def test_headers_set_add_remove_and_host() -> None:
    with RecordingBackend() as primary, RecordingBackend() as shadow:
        route = {
            "match": {"path_prefix": "/"},
            "host": "internal.example:8443",
            "headers": {
                "set": {"X-Env": "prod", "x-forwarded-proto": "https"},
                "add": {"x-tag": "from-route"},
                "remove": ["X-Debug"],
            },
            "shadows": [
                {"backend": "s", "percent": 100, "headers": {"set": {"x-shadow-only": "1"}}}
            ],
        }
        with ProxyProcess(config(primary, shadow, route)) as proxy:
            sent = {"x-env": "dev", "x-debug": "1", "x-tag": "client", "host": "public.example"}
            assert get(proxy, "/a", sent) == 200
            settle(proxy, "r", "s", 1)
            got = only(primary.requests)
            assert got.header_values("x-env") == ["prod"]
            assert got.header_values("x-debug") == []
            assert got.header_values("x-tag") == ["client", "from-route"]
            assert got.header_values("x-forwarded-proto") == ["https"]
            assert got.header_values("host") == ["internal.example:8443"]
            # X-Forwarded-Host keeps what the client asked for
            assert got.header("x-forwarded-host") == "public.example"
            assert got.header("x-shadow-only") is None
            copy = only(shadow.requests)
            assert copy.header_values("x-env") == ["prod"]
            assert copy.header_values("x-debug") == []
            assert copy.header_values("x-tag") == ["client", "from-route"]
            assert copy.header_values("host") == ["internal.example-shadow:8443"]
            assert copy.header("x-shadow-only") == "1"


def test_host_backend_is_the_endpoint_authority() -> None:
    with RecordingBackend() as primary:
        cfg = {
            "backends": {"p": backend_entry(primary.url)},
            "routes": [{"name": "r", "backend": "p", "host": "backend"}],
        }
        with ProxyProcess(cfg) as proxy:
            assert get(proxy, "/x", {"host": "public.example"}) == 200
            assert only(primary.requests).header("host") == f"127.0.0.1:{primary.port}"


def test_shadow_match_and_sampling_read_the_clients_request() -> None:
    """The shadow's extra `match` is on top of the route's match: the client's path, while
    the copy it sends is the rewritten one."""
    with RecordingBackend() as primary, RecordingBackend() as shadow:
        route = {
            "match": {"path_prefix": "/api/"},
            "rewrite_path": {"prefix": "/"},
            "headers": {"remove": ["x-user"]},
            "shadows": [
                {
                    "backend": "s",
                    "percent": 100,
                    "match": {"path_prefix": "/api/orders", "headers": {"x-user": "u1"}},
                }
            ],
        }
        with ProxyProcess(config(primary, shadow, route)) as proxy:
            assert get(proxy, "/api/orders/1", {"x-user": "u1"}) == 200
            assert get(proxy, "/api/users/1", {"x-user": "u1"}) == 200
            assert get(proxy, "/api/orders/2", {"x-user": "u2"}) == 200
            assert [r.target for r in primary.requests] == ["/orders/1", "/users/1", "/orders/2"]
            assert all(r.header("x-user") is None for r in primary.requests)
            got = settle(proxy, "r", "s", 1)
            assert got.get("ok") == 1
            copy = only(shadow.requests)
            assert copy.target == "/orders/1"
            assert copy.header("x-user") is None


def test_routes_without_mutations_forward_the_target_byte_for_byte() -> None:
    with RecordingBackend() as primary:
        cfg = {
            "backends": {"p": backend_entry(primary.url)},
            "routes": [
                {"name": "rw", "match": {"path_prefix": "/rw/"}, "backend": "p",
                 "rewrite_path": {"prefix": "/"}},
                {"name": "plain", "backend": "p"},
            ],
        }  # fmt: skip
        with ProxyProcess(cfg) as proxy:
            raw = b"GET /rw/a%20b?q=%3F HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            assert raw_request(proxy.port, raw).startswith(b"HTTP/1.1 200")
            raw = b"GET /plain/a%20b?q HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            assert raw_request(proxy.port, raw).startswith(b"HTTP/1.1 200")
            assert [r.target for r in primary.requests] == ["/a%20b?q=%3F", "/plain/a%20b?q"]


def test_post_body_and_rewrite_reach_primary_and_shadow() -> None:
    with RecordingBackend() as primary, RecordingBackend() as shadow:
        route = {"match": {"path_prefix": "/in/"}, "rewrite_path": {"prefix": "/out/"}}
        with ProxyProcess(config(primary, shadow, route)) as proxy:
            conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=T)
            conn.request("POST", "/in/doc", body=b'{"a": 1}')
            assert conn.getresponse().status == 200
            conn.close()
            settle(proxy, "r", "s", 1)
            got, copy = only(primary.requests), only(shadow.requests)
            assert (got.method, got.target, got.body) == ("POST", "/out/doc", b'{"a": 1}')
            assert (copy.method, copy.target, copy.body) == ("POST", "/out/doc", b'{"a": 1}')


ERRORS = [
    ("rewrite_path: {prefix: v2}", "routes[0].rewrite_path.prefix: must start with '/'"),
    ("rewrite_path: {regex: '(', replacement: x}", "routes[0].rewrite_path.regex: bad regex"),
    (
        r"rewrite_path: {regex: '^/a', replacement: '\2'}",
        "routes[0].rewrite_path: replacement refers to group 2",
    ),
    ("rewrite_path: {regex: a}", "routes[0].rewrite_path: needs prefix, or regex and replacement"),
    (
        "rewrite_path: {prefix: /, regex: a, replacement: b}",
        "routes[0].rewrite_path: set either prefix, or regex and replacement",
    ),
    ("headers: {set: {Host: x}}", "routes[0].headers.set: header 'host' cannot be changed"),
    ("headers: {add: {Content-Length: '1'}}", "routes[0].headers.add: header 'content-length'"),
    ("headers: {remove: [connection]}", "routes[0].headers.remove: header 'connection'"),
    ("headers: {set: {x-request-id: a}}", "routes[0].headers.set: header 'x-request-id'"),
    ('headers: {set: {x-a: "a\\r\\nx-b: c"}}', "routes[0].headers.set: header 'x-a': a value"),
    ("headers: {append: {x-a: b}}", "routes[0].headers.append: unknown key"),
    ("host: 'a b'", "routes[0].host: not a host[:port]"),
]


@pytest.mark.parametrize(("extra", "error"), ERRORS, ids=[e for _, e in ERRORS])
def test_config_errors_name_the_key(tmp_path: Path, extra: str, error: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "backends: {a: {endpoints: ['http://127.0.0.1:1']}}\n"
        f"routes:\n  - name: r\n    match: {{path_prefix: /a}}\n    backend: a\n    {extra}\n"
    )
    result = check(path)
    assert result.returncode == 2, result.stdout
    assert error in result.stderr, result.stderr


def test_prefix_form_needs_a_matched_prefix(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "backends: {a: {endpoints: ['http://127.0.0.1:1']}}\n"
        "routes:\n  - {name: r, match: {path_regex: ^/a}, backend: a, rewrite_path: {prefix: /}}\n"
    )
    result = check(path)
    assert result.returncode == 2
    assert "routes[0]: rewrite_path.prefix replaces the matched match.path_prefix" in result.stderr


def test_a_websocket_handshake_is_rewritten_as_any_request() -> None:
    """An upgrade request on a rewriting route: the backend sees the rewritten handshake (path
    and headers), and the tunnel works through it."""
    with WebSocketServer() as ws:
        cfg = {
            "backends": {"w": backend_entry(ws.url)},
            "routes": [
                {"name": "ws", "match": {"path_prefix": "/live/"}, "backend": "w",
                 "rewrite_path": {"prefix": "/"}, "headers": {"set": {"x-via": "route"}}},
            ],
        }  # fmt: skip
        with ProxyProcess(cfg) as proxy:

            async def talk() -> str:
                url = f"ws://{proxy.host}:{proxy.port}/live/greet"
                async with connect(url, open_timeout=10, close_timeout=10) as conn:
                    return str(await asyncio.wait_for(conn.recv(), 10))

            assert asyncio.run(talk()) == "hello"
            path, headers = ws.handshakes[0]
            assert path == "/greet"
            assert headers.get("x-via") == "route"
