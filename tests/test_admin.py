"""The admin server over real sockets on 127.0.0.1, on both asyncio's loop and uvloop.

The server runs on an event loop in a background thread (as it would beside the proxy); the test
thread talks to it with `requests` or with a raw socket when the exact bytes on one connection
matter (keep-alive, pipelining, limits, closing).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import orjson
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from shadowlane import __version__
from shadowlane.admin import AdminApp, AdminRequest, AdminResponse, json_response
from shadowlane.metrics import Metrics
from support.servers import LoopThread

T = TypeVar("T")
TIMEOUT = 5.0


class Admin:
    """A started AdminApp and how to reach it."""

    def __init__(self, lt: LoopThread, app: AdminApp, metrics: Metrics) -> None:
        self.lt = lt
        self.app = app
        self.metrics = metrics
        server = lt.run(app.start("127.0.0.1", 0))
        self.port: int = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.closed = False

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=TIMEOUT, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=TIMEOUT, **kw)

    def raw(self) -> RawClient:
        return RawClient(self.port)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.lt.run(self.app.close(grace=1.0))


class RawClient:
    """A socket with just enough HTTP/1.1 response parsing to see keep-alive and pipelining."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self, *, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next response; `head=True` for an answer to HEAD (headers only)."""
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed before a response head: {self.buf!r}"
        raw_head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head else int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            assert self._fill(), "connection closed inside a response body"
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def at_eof(self) -> bool:
        """True when the server closed the connection (waits at most the socket timeout)."""
        try:
            return not self.buf and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def get_request(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: admin\r\n{extra}\r\n".encode()


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_thread(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    with LoopThread(request.param, timeout=TIMEOUT) as lt:
        yield lt


@pytest.fixture
def make_admin(loop_thread: LoopThread) -> Iterator[Callable[..., Admin]]:
    started: list[Admin] = []

    def make(token: str | None = None, **kw: Any) -> Admin:
        metrics = Metrics()
        admin = Admin(loop_thread, AdminApp(metrics, token, **kw), metrics)
        started.append(admin)
        return admin

    yield make
    for admin in started:
        admin.close()


@pytest.fixture
def admin(make_admin: Callable[..., Admin]) -> Admin:
    return make_admin()


async def echo(request: AdminRequest) -> AdminResponse:
    return json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": request.headers,
            "params": request.params,
            "body_len": len(request.body),
        }
    )


# -- built-in routes ----------------------------------------------------------------------------


def test_metrics_content_type_and_content(admin: Admin) -> None:
    admin.metrics.observe_request("orders", "orders-v1", 200, 0.01)
    admin.metrics.shadow_outcome("orders", "orders-v2", "timeout", 2)
    r = admin.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }
    key = (("backend", "orders-v1"), ("code", "200"), ("route", "orders"))
    assert samples[("shadowlane_requests_total", key)] == 1
    key = (("outcome", "timeout"), ("route", "orders"), ("target", "orders-v2"))
    assert samples[("shadowlane_shadow_requests_total", key)] == 2
    assert samples[("shadowlane_build_info", (("version", __version__),))] == 1


def test_metrics_gauge_provider_runs_on_the_loop(admin: Admin) -> None:
    threads: list[str] = []

    def provider() -> list[tuple[tuple[str, ...], float]]:
        threads.append(threading.current_thread().name)
        return [(("orders-v2",), 3.0)]

    admin.metrics.set_gauge_provider("shadowlane_test_depth", "d", ("target",), provider)
    r = admin.get("/metrics")
    assert 'shadowlane_test_depth{target="orders-v2"} 3.0' in r.text
    assert threads and threads[0] != threading.current_thread().name


def test_healthz_200_then_503(admin: Admin) -> None:
    r = admin.get("/healthz")
    assert (r.status_code, r.text) == (200, "ok\n")
    admin.app.set_ready(False)
    r = admin.get("/healthz")
    assert (r.status_code, r.text) == (503, "not ready\n")
    admin.app.set_ready(True)
    assert admin.get("/healthz").status_code == 200


def test_head_healthz_has_no_body(admin: Admin) -> None:
    c = admin.raw()
    c.send(b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n" + get_request("/healthz"))
    status, headers, body = c.response(head=True)
    assert (status, headers["content-length"], body) == (200, "3", b"")
    # The next response on the same connection parses cleanly, so no stray body bytes were sent.
    assert c.response()[2] == b"ok\n"
    c.close()


def test_status(admin: Admin) -> None:
    r = admin.get("/api/status")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    data = r.json()
    assert data["version"] == __version__
    assert data["pid"] == os.getpid()
    assert 0 <= data["uptime_seconds"] < 60
    assert data["ready"] is True


def test_unknown_path_404_json(admin: Admin) -> None:
    r = admin.get("/nope")
    assert r.status_code == 404
    assert r.json() == {"error": "not found", "path": "/nope"}
    assert admin.get("/metrics/").status_code == 404


def test_wrong_method_405_with_allow(admin: Admin) -> None:
    r = admin.post("/metrics", data=b"x")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    assert r.json()["allowed"] == ["GET", "HEAD"]


# -- routes added by others ---------------------------------------------------------------------


def test_request_fields_and_path_params(admin: Admin) -> None:
    admin.app.route("POST", "/api/routes/{name}/weights", echo)
    admin.app.route("GET", "/api/routes/special/weights", echo)
    r = admin.post(
        "/api/routes/orders%20v2/weights?dry_run=1&x=a&x=b&empty=",
        data=b"12345",
        headers={"X-Thing": "A", "x-thing-2": "B"},
    )
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["method"] == "POST"
    assert data["path"] == "/api/routes/orders%20v2/weights"
    assert data["params"] == {"name": "orders v2"}
    assert data["query"] == {"dry_run": "1", "x": "a", "empty": ""}
    assert data["headers"]["x-thing"] == "A"
    assert data["headers"]["x-thing-2"] == "B"
    assert data["body_len"] == 5
    # Exact path wins over the pattern; a pattern path with another method is a 405.
    r = admin.get("/api/routes/special/weights")
    assert r.json()["params"] == {}
    r = admin.get("/api/routes/orders/weights")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    # An empty segment does not match a parameter.
    assert admin.post("/api/routes//weights").status_code == 404


def test_route_registration_is_validated(admin: Admin) -> None:
    with pytest.raises(ValueError, match="already registered"):
        admin.app.route("GET", "/metrics", echo)
    with pytest.raises(ValueError, match="must start"):
        admin.app.route("GET", "api", echo)
    with pytest.raises(ValueError, match="duplicate"):
        admin.app.route("GET", "/a/{x}/{x}", echo)
    with pytest.raises(ValueError, match="bad path parameter"):
        admin.app.route("GET", "/a/{x-y}", echo)


def test_handler_error_is_json_500_and_connection_survives(admin: Admin) -> None:
    async def broken(request: AdminRequest) -> AdminResponse:
        raise RuntimeError("boom")

    admin.app.route("GET", "/broken", broken)
    c = admin.raw()
    c.send(get_request("/broken"))
    status, _, body = c.response()
    assert status == 500
    assert orjson.loads(body) == {"error": "internal error"}
    c.send(get_request("/healthz"))
    assert c.response()[0] == 200
    c.close()


# -- authorization ------------------------------------------------------------------------------


def _counting_route(admin: Admin) -> list[AdminRequest]:
    calls: list[AdminRequest] = []

    async def handler(request: AdminRequest) -> AdminResponse:
        calls.append(request)
        return json_response({"applied": True})

    admin.app.route("POST", "/api/reload", handler, mutating=True)
    return calls


def test_mutating_route_without_configured_token_is_403(make_admin: Callable[..., Admin]) -> None:
    for token in (None, ""):
        admin = make_admin(token)
        calls = _counting_route(admin)
        r = admin.post("/api/reload", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403
        assert r.json() == {"error": "admin token not configured"}
        assert calls == []


def test_mutating_route_token_checks(make_admin: Callable[..., Admin]) -> None:
    admin = make_admin("s3cret")
    calls = _counting_route(admin)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        r = admin.post("/api/reload", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"] == "missing or wrong admin token"
    assert calls == []
    r = admin.post("/api/reload", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert r.json() == {"applied": True}
    assert len(calls) == 1
    # Read-only routes never need the token.
    assert admin.get("/healthz").status_code == 200


# -- connection handling ------------------------------------------------------------------------


def test_keep_alive_two_requests_on_one_connection(admin: Admin) -> None:
    c = admin.raw()
    c.send(get_request("/healthz"))
    status, headers, body = c.response()
    assert (status, body) == (200, b"ok\n")
    assert headers.get("connection") != "close"
    c.send(get_request("/api/status"))
    status, _, body = c.response()
    assert status == 200
    assert orjson.loads(body)["version"] == __version__
    c.close()


def test_pipelined_requests_answered_in_order(admin: Admin) -> None:
    c = admin.raw()
    c.send(get_request("/healthz") + get_request("/nope") + get_request("/api/status"))
    assert [c.response()[0] for _ in range(3)] == [200, 404, 200]
    c.close()


def test_connection_close_requested_by_client(admin: Admin) -> None:
    c = admin.raw()
    c.send(get_request("/healthz", "Connection: close\r\n"))
    assert c.response()[0] == 200
    assert c.at_eof()
    c.close()


def test_body_too_large_by_content_length_is_413_without_reading_it(admin: Admin) -> None:
    admin.app.route("POST", "/echo", echo)
    c = admin.raw()
    size = (1 << 20) + 1
    c.send(f"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n".encode())
    status, headers, body = c.response()
    assert status == 413
    assert headers["connection"] == "close"
    assert orjson.loads(body) == {"error": "request body too large", "max_bytes": 1 << 20}
    assert c.at_eof()
    c.close()


def test_body_too_large_chunked_is_413(admin: Admin) -> None:
    admin.app.route("POST", "/echo", echo)
    c = admin.raw()
    c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * (256 * 1024)
    try:
        for _ in range(5):  # 1.25 MiB in total; the server answers once it passes 1 MiB
            c.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close before we finish sending; the response is already queued
    assert c.response()[0] == 413
    c.close()


def test_body_at_limit_is_accepted(make_admin: Callable[..., Admin]) -> None:
    admin = make_admin(max_body=1000)
    admin.app.route("POST", "/echo", echo)
    assert admin.post("/echo", data=b"x" * 1000).json()["body_len"] == 1000
    assert admin.post("/echo", data=b"x" * 1001).status_code == 413


def test_expect_100_continue(admin: Admin) -> None:
    admin.app.route("POST", "/echo", echo)
    c = admin.raw()
    c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert c.response()[0] == 100
    c.send(b"abcd")
    status, _, body = c.response()
    assert status == 200
    assert orjson.loads(body)["body_len"] == 4
    c.close()


def test_header_too_large_is_431(make_admin: Callable[..., Admin]) -> None:
    admin = make_admin(max_header=4096)
    c = admin.raw()
    c.send(get_request("/healthz", "X-Big: " + "a" * 8192 + "\r\n"))
    status, headers, _ = c.response()
    assert status == 431
    assert headers["connection"] == "close"
    c.close()


def test_malformed_request_is_400(admin: Admin) -> None:
    c = admin.raw()
    c.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    assert c.response()[0] == 400
    assert c.at_eof()
    c.close()


def test_idle_connection_is_closed_after_timeout(make_admin: Callable[..., Admin]) -> None:
    admin = make_admin(idle_timeout=0.3)
    c = admin.raw()
    c.send(get_request("/healthz"))
    assert c.response()[0] == 200
    started = time.monotonic()
    assert c.at_eof()  # bounded by the socket timeout (5 s)
    assert time.monotonic() - started >= 0.2
    c.close()
    # A client that never sends anything is closed too.
    c = admin.raw()
    assert c.at_eof()
    c.close()


def test_close_closes_idle_keep_alive_connections_and_stops_listening(admin: Admin) -> None:
    c = admin.raw()
    c.send(get_request("/healthz"))
    assert c.response()[0] == 200
    admin.close()
    assert c.at_eof()
    c.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", admin.port), timeout=TIMEOUT).close()


def test_close_lets_in_flight_request_finish(admin: Admin) -> None:
    entered = threading.Event()
    release: asyncio.Event | None = None

    async def slow(request: AdminRequest) -> AdminResponse:
        nonlocal release
        release = asyncio.Event()
        entered.set()
        await release.wait()
        return json_response({"done": True})

    admin.app.route("GET", "/slow", slow)
    c = admin.raw()
    c.send(get_request("/slow"))
    assert entered.wait(TIMEOUT)
    closing = asyncio.run_coroutine_threadsafe(admin.app.close(grace=TIMEOUT), admin.lt.loop)
    admin.closed = True
    admin.lt.run(_healthz_is_draining(admin.app))
    assert release is not None
    admin.lt.loop.call_soon_threadsafe(release.set)
    status, headers, body = c.response()
    assert (status, orjson.loads(body)) == (200, {"done": True})
    assert headers["connection"] == "close"
    assert c.at_eof()
    closing.result(TIMEOUT)
    c.close()


async def _healthz_is_draining(app: AdminApp) -> None:
    r = await app.handle(AdminRequest("GET", "/healthz"))
    assert (r.status, r.body) == (503, b"draining\n")


def test_start_on_given_socket(loop_thread: LoopThread) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    app = AdminApp(Metrics())
    loop_thread.run(app.start("", 0, sock=sock))
    try:
        r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT)
        assert r.status_code == 200
    finally:
        loop_thread.run(app.close(grace=1.0))
