"""Process life cycle of `shadowlane run`: startup line, SIGTERM drain, --workers, access log.

Each test starts its own proxy (they end it), through the conftest `proxy_factory`, in front of
the conftest `backend` (echo; `/delay/S` answers after S seconds).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from support.backend import RecordingBackend, dead_port
from support.client import InFlight, get
from support.procfs import connected_to, tcp_sockets, workers_listening
from support.proxy import ProxyFactory, basic_config, read_http_response
from support.wait import wait_until

T = 5.0
LOOPBACK = "127.0.0.1"


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0):
            return False
    except (ConnectionRefusedError, ConnectionResetError):
        # reset: the connect landed in the backlog just as the listener closed (the kernel
        # resets what was never accepted): the port is not accepting either way
        return True


# -- startup ------------------------------------------------------------------------------------


def test_startup_line_says_what_listens_where(
    backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(basic_config(backend.url))
    (line,) = wait_until(
        lambda: proxy.stderr_lines("listening on"), T, "the startup line on stderr"
    )
    assert f"http://127.0.0.1:{proxy.port}" in line, line
    assert f"127.0.0.1:{proxy.admin_port}" in line, line
    assert "1 route" in line, line
    assert proxy.stdout_text() == "", "the startup line belongs on stderr"


# -- SIGTERM ------------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests_then_exits_0(
    backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(basic_config(backend.url))
    # an idle keep-alive client connection, open when the signal comes
    idle = socket.create_connection((LOOPBACK, proxy.port), timeout=T)
    idle.sendall(b"GET /idle HTTP/1.1\r\nHost: life.test\r\n\r\n")
    assert read_http_response(idle, timeout=T).status == 200

    flights = [InFlight(proxy.port, f"/delay/1?i={i}") for i in range(5)]
    for f in flights:
        f.start()
    backend.wait_for_requests(6)  # all five are at the backend, waiting for their answer
    signalled = time.monotonic()
    proxy.send_signal(signal.SIGTERM)

    wait_until(lambda: refuses_connections(proxy.port), 2.0, "new connections to be refused")
    assert proxy.alive(), "the proxy exited before its in-flight requests were answered"
    assert time.monotonic() - signalled < 0.9, "refusing new connections took too long"

    with idle:  # idle connections are closed at once, not left to the idle timeout
        idle.settimeout(2.0)
        assert idle.recv(1) == b"", "idle keep-alive connection not closed by the drain"

    for f in flights:
        resp = f.response()
        assert resp.status == 200, (f.target, resp.status, resp.body)
        assert json.loads(resp.body)["target"] == f.target  # complete, and the right one
        assert resp.header("connection") == "close", resp.headers  # no keep-alive while draining
    assert proxy.wait(T) == 0, proxy.stderr_text()
    assert time.monotonic() - signalled < 3.0


def test_sigterm_when_idle_exits_0_promptly(
    backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(basic_config(backend.url))
    assert get(proxy.port, "/warm").status == 200
    start = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(T) == 0, proxy.stderr_text()
    assert time.monotonic() - start < 1.5


def test_drain_timeout_bounds_the_shutdown(
    backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    """`limits.drain_timeout: 500ms`: a request slower than that is cut off (the client never
    gets a complete-looking answer) and the process still exits 0, on time."""
    proxy = proxy_factory(basic_config(backend.url, limits={"drain_timeout": "500ms"}))
    slow = InFlight(proxy.port, "/delay/4")
    slow.start()
    backend.wait_for_requests(1)
    start = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(T) == 0, proxy.stderr_text()
    assert 0.4 <= time.monotonic() - start < 2.5
    slow.join(T)
    assert not slow.is_alive()
    assert isinstance(slow.result, ConnectionError), slow.result  # closed, not timed out


# -- --workers ----------------------------------------------------------------------------------


def test_workers_all_serve_and_sigterm_stops_them_all(
    backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(basic_config(backend.url), workers=2)
    # wait for each worker to have its own SO_REUSEPORT listener, or the first requests all
    # go to the quicker one
    workers = workers_listening(proxy, 2, T)
    assert proxy.pid not in workers
    # union of three reads: /proc/net/tcp is read a page at a time and can skip a row
    assert len(tcp_sockets(proxy.port, listening=True, reads=3)) == 2

    (line,) = wait_until(
        lambda: proxy.stderr_lines("listening on"), T, "the startup line on stderr"
    )
    assert "2 workers" in line, line
    assert f"http://127.0.0.1:{proxy.port}" in line, line

    with ThreadPoolExecutor(16) as ex:
        statuses = list(ex.map(lambda i: get(proxy.port, f"/w/{i}").status, range(64)))
    assert statuses == [200] * 64
    # each worker served some of them: each holds a pooled connection to the backend
    served = connected_to(workers, backend.port)
    for pid in workers:
        assert served[pid], f"worker {pid} has no upstream connection"

    slow = InFlight(proxy.port, "/delay/1")
    slow.start()
    backend.wait_for_requests(65)
    start = time.monotonic()
    os.kill(proxy.pid, signal.SIGTERM)  # the parent only; it relays to the workers
    assert proxy.wait(T) == 0, proxy.stderr_text()
    assert time.monotonic() - start < 3.0
    assert slow.response().status == 200
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the parent"
    assert refuses_connections(proxy.port)


# -- access log ---------------------------------------------------------------------------------


def access_log_config(backend: RecordingBackend) -> dict[str, Any]:
    return {
        "access_log": True,
        "backends": {
            "main": {"endpoints": [backend.url], "timeout": "5s"},
            "down": {"endpoints": [f"http://{LOOPBACK}:{dead_port()}"], "connect_timeout": "1s"},
        },
        "routes": [
            {"name": "to-down", "match": {"path_prefix": "/down"}, "backend": "down"},
            {"name": "to-main", "match": {"path_prefix": "/"}, "backend": "main"},
        ],
    }


def test_access_log_one_json_line_per_request(
    backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(access_log_config(backend))
    assert get(proxy.port, "/a", [("X-Request-Id", "client-id-1")]).status == 200
    assert get(proxy.port, "/status/418").status == 418
    assert get(proxy.port, "/delay/0.2").status == 200
    assert get(proxy.port, "/down/x").status == 502
    lines = wait_until(lambda: len(proxy.access_log()) >= 4 and proxy.access_log(), T, "4 lines")
    assert len(lines) == 4, lines
    a, teapot, slow, down = lines

    seen = {r.target: r.header("x-request-id") for r in backend.requests}
    for line, target in ((a, "/a"), (teapot, "/status/418"), (slow, "/delay/0.2")):
        assert (line["route"], line["backend"]) == ("to-main", "main"), line
        assert line["request_id"] == seen[target], (line, seen)
    assert a["request_id"] == "client-id-1"
    assert uuid.UUID(teapot["request_id"])
    assert teapot["request_id"] != slow["request_id"]
    assert [x["status"] for x in lines] == [200, 418, 200, 502]
    assert (down["route"], down["backend"]) == ("to-down", "down"), down
    assert down["request_id"], down
    for line in lines:
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0, line
    assert 200 <= slow["duration_ms"] < 2000, slow
    assert a["duration_ms"] < slow["duration_ms"]


def test_access_log_records_requests_that_match_no_route(
    backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    config = access_log_config(backend)
    config["routes"] = [{"name": "only", "match": {"path": "/only"}, "backend": "main"}]
    proxy = proxy_factory(config)
    assert get(proxy.port, "/nowhere").status == 404
    assert get(proxy.port, "/only").status == 200  # logged after the 404, if that is logged
    wait_until(lambda: len(proxy.access_log()) >= 2, T, "two access log lines")
    lines = proxy.access_log()
    assert [x["status"] for x in lines] == [404, 200], lines
    assert lines[0]["request_id"], lines[0]


def test_access_log_lines_are_written_as_requests_happen(
    backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    """Without PYTHONUNBUFFERED (as under systemd or docker, stdout a pipe or a file), a line
    must still show up promptly, not when 8 KiB have piled up or at exit."""
    proxy = proxy_factory(access_log_config(backend), env={"PYTHONUNBUFFERED": ""})
    assert get(proxy.port, "/prompt").status == 200
    try:
        wait_until(lambda: proxy.access_log(), 3.0, "the access log line")
    except TimeoutError:
        proxy.stop()
        later = "appeared at exit" if proxy.access_log() else "never appeared"
        pytest.fail(f"access log line not written within 3s of the request ({later})")
