"""Downstream limits and the overload manager, end to end: the real `shadowlane run` process,
real recording backends, raw client sockets.

Each test states the time a limit must act at and checks it within a bounded tolerance: the
sweep that enforces the timeouts runs every 250 ms, so "closed at T" means between T and
T + 1.5 s on a loaded 2-core machine, never before T.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from support.backend import RecordingBackend
from support.configs import basic_config, shadow_config
from support.metrics import scrape, settle
from support.proxy import LOOPBACK, ProxyProcess, ResponseReader, read_http_response
from support.wait import wait_until

ProxyFactory = Callable[..., ProxyProcess]
LIMITED = "shadowlane_downstream_limited_total"
T = 5.0


def connect(proxy: ProxyProcess) -> socket.socket:
    return socket.create_connection((LOOPBACK, proxy.port), timeout=T)


def limited(proxy: ProxyProcess, limit: str) -> float:
    return scrape(proxy).sum(LIMITED, limit=limit)


def closed_by_peer(sock: socket.socket, timeout: float = T) -> bool:
    """True once the peer closed (EOF or reset) within `timeout`; False if it stayed open."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (clock ticks to seconds)."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- slow clients ------------------------------------------------------------------------------


def test_slow_post_gets_408_at_the_window_and_the_backend_never_sees_a_whole_request(
    proxy_factory: ProxyFactory, backend: RecordingBackend
) -> None:
    """min_body_rate 1 KiB/s over a 1 s window; the client sends 10 B every 100 ms (100 B/s)."""
    proxy = proxy_factory(
        basic_config(backend.url, limits={"min_body_rate": "1KiB", "body_rate_window": "1s"})
    )
    with connect(proxy) as sock:
        sock.sendall(
            b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 10
        )
        t0 = time.monotonic()
        answered = None
        sock.settimeout(0.1)
        got = b""
        while time.monotonic() - t0 < 6:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    sock.sendall(b"a" * 10)
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
            answered = answered or time.monotonic() - t0
        assert answered is not None, f"no answer to a 100 B/s upload in 6 s: {got!r}"
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
        assert b"connection: close" in got.lower()
    # the window starts at the first sweep after the head (<= 0.25 s) and is checked by a sweep
    assert 1.0 <= answered <= 2.5, f"408 after {answered:.2f}s with a 1 s window"
    assert limited(proxy, "body_rate") == 1
    # the backend got the head and part of the body, never a complete request
    assert not [r for r in backend.requests if r.path == "/slow"]


def test_upload_above_the_rate_is_not_cut(
    proxy_factory: ProxyFactory, backend: RecordingBackend
) -> None:
    """4 KiB/s against min 1 KiB/s, over three windows: served whole."""
    proxy = proxy_factory(
        basic_config(backend.url, limits={"min_body_rate": "1KiB", "body_rate_window": "1s"})
    )
    size = 12 * 1024
    with connect(proxy) as sock:
        sock.sendall(b"POST /steady HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        sent = 0
        while sent < size:
            sock.sendall(b"b" * 400)
            sent += 400
            time.sleep(0.1)  # the client's pace is the point of the test, not a wait
        resp = read_http_response(sock, timeout=T)
    assert resp.status == 200
    assert [len(r.body) for r in backend.requests if r.path == "/steady"] == [size]
    assert limited(proxy, "body_rate") == 0


def test_slowloris_head_trickle_gets_408_at_header_timeout(
    proxy_factory: ProxyFactory, backend: RecordingBackend
) -> None:
    proxy = proxy_factory(basic_config(backend.url, limits={"header_timeout": "1s"}))
    with connect(proxy) as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET /loris HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.1)
        got = b""
        while time.monotonic() - t0 < 5:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-A: b\r\n")  # a header line every 100 ms, never the end
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
        answered = time.monotonic() - t0
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert 1.0 <= answered <= 2.5, f"closed after {answered:.2f}s with header_timeout 1s"
    assert limited(proxy, "header_timeout") == 1
    assert backend.raw_bytes == 0


# -- connection cap, requests per connection ---------------------------------------------------


def test_connection_cap_closes_at_accept_and_counts(
    proxy_factory: ProxyFactory, backend: RecordingBackend
) -> None:
    proxy = proxy_factory(basic_config(backend.url, limits={"max_connections": 3}))
    # the start-up's readiness probe may still hold a slot on a loaded machine: wait it out
    wait_until(
        lambda: scrape(proxy).sum("shadowlane_downstream_connections") == 0, T, "no connection"
    )
    held = [connect(proxy) for _ in range(3)]
    try:
        for sock in held:  # each is accepted and served: they count against the cap
            sock.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_http_response(sock, timeout=T).status == 200
        try:
            extra = connect(proxy)
        except ConnectionResetError:
            pass  # reset at accept before connect() returned (a busy machine's scheduling)
        else:
            with extra:
                with contextlib.suppress(OSError):
                    extra.sendall(b"GET /extra HTTP/1.1\r\nHost: x\r\n\r\n")
                assert closed_by_peer(extra), "the 4th connection was kept open"
        assert limited(proxy, "connections") == 1
        assert [r.path for r in backend.requests].count("/extra") == 0
        assert scrape(proxy).sum("shadowlane_downstream_connections") == 3
    finally:
        for sock in held:
            sock.close()
    # below the cap again: new connections are served
    wait_until(
        lambda: scrape(proxy).sum("shadowlane_downstream_connections") == 0, T, "conns closed"
    )
    with connect(proxy) as sock:
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_http_response(sock, timeout=T).status == 200


def test_max_requests_per_connection_closes_after_the_last(
    proxy_factory: ProxyFactory, backend: RecordingBackend
) -> None:
    proxy = proxy_factory(basic_config(backend.url, limits={"max_requests_per_connection": 3}))
    with connect(proxy) as sock:
        reader = ResponseReader(sock)
        answers = []
        for i in range(3):
            sock.sendall(b"GET /n/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            answers.append(reader.read(timeout=T))
        assert [a.status for a in answers] == [200, 200, 200]
        assert [a.header("connection") for a in answers] == [None, None, "close"]
        assert closed_by_peer(sock)
    assert [r.path for r in backend.requests] == ["/n/0", "/n/1", "/n/2"]


# -- file descriptors --------------------------------------------------------------------------


class LimitedProxy(ProxyProcess):
    """The proxy under `prlimit --nofile=N:N`: a process that runs out of descriptors."""

    def __init__(self, config: dict[str, Any], nofile: int) -> None:
        super().__init__(config)
        self.nofile = nofile

    @property
    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *super().command]


def _flood(proxy: ProxyProcess, n: int) -> list[socket.socket]:
    """`n` connections opened and held; those the proxy resets at once (past `fd_reserve`) may
    be reset before `connect` returns, on loopback, which is the flood doing its work."""
    socks = []
    for _ in range(n):
        try:
            socks.append(socket.create_connection((LOOPBACK, proxy.port), timeout=T))
        except ConnectionResetError:
            continue
    assert socks, "no connection of the flood was accepted"
    return socks


@pytest.mark.parametrize("reserve", [64, 0])
def test_out_of_descriptors_no_busy_accept_loop_and_serving_after(
    backend: RecordingBackend, reserve: int
) -> None:
    """RLIMIT_NOFILE 128. With fd_reserve 64, connections accepted past descriptor 64 are
    closed at once and counted (`fds`); with fd_reserve 0 the process really meets EMFILE at
    accept, and the listener pauses accepting for 100 ms each time, counted the same way (no
    busy loop, the listener keeps listening). Either way: little CPU while flooded, serving
    after."""
    config = basic_config(backend.url, limits={"fd_reserve": reserve})
    with LimitedProxy(config, nofile=128) as proxy:
        pid = proxy.pid
        socks = _flood(proxy, 200)
        try:
            cpu0 = cpu_seconds(pid)
            # clients keep knocking for 2 s while the process has no descriptor to spare
            t0 = time.monotonic()
            attempts = 0
            while time.monotonic() - t0 < 2.0:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((LOOPBACK, proxy.port), timeout=1) as s,
                ):
                    s.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
                    closed_by_peer(s, 1.0)
                attempts += 1
            burned = cpu_seconds(pid) - cpu0
            assert attempts > 0
            # each knock costs an accept and a close (more on a loaded machine, where the
            # knocks are fewer too); a busy accept loop burns the core whatever the knocks
            assert burned < 0.3 + attempts * 0.002, (
                f"{burned:.2f}s of CPU for {attempts} knocks in 2 s flooded: a busy accept loop"
            )
            # and with nobody knocking, a flooded process is idle: 1 s measured, not waited on
            cpu1, t1 = cpu_seconds(pid), time.monotonic()
            while time.monotonic() - t1 < 1.0:
                time.sleep(0.1)
            idle = cpu_seconds(pid) - cpu1
            assert idle < 0.3, f"{idle:.2f}s of CPU in 1 s flooded and idle: a busy accept loop"
            assert proxy.alive()
        finally:
            for s in socks:
                s.close()

        # descriptors back: served again
        def served() -> bool:
            try:
                with socket.create_connection((LOOPBACK, proxy.port), timeout=2) as s:
                    s.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
                    return read_http_response(s, timeout=2).status == 200
            except OSError:
                return False

        wait_until(served, 10.0, "a request served after the flood")
        # read once descriptors are back: the admin listener meets EMFILE like the proxy's
        assert limited(proxy, "fds") > 0


# -- overload ----------------------------------------------------------------------------------


def _shadowed(primary: RecordingBackend, shadow: RecordingBackend, **limits: Any) -> dict[str, Any]:
    return shadow_config({"p": primary.url, "s": shadow.url}, limits=limits)


def test_rss_watermark_sheds_shadow_work_first(
    proxy_factory: ProxyFactory, backends: Callable[..., RecordingBackend]
) -> None:
    """rss shed_shadows at 1 byte (always past it), refuse off: every client is served, no
    copy is made, each is counted `shed`."""
    primary, shadow = backends(), backends()
    proxy = proxy_factory(_shadowed(primary, shadow, overload={"rss": {"shed_shadows": 1}}))
    wait_until(lambda: scrape(proxy).sum("shadowlane_overload_level") == 1, T, "level shed")
    for i in range(5):
        with connect(proxy) as sock:
            sock.sendall(b"GET /shed/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            assert read_http_response(sock, timeout=T).status == 200
    got = settle(proxy, "r1", "s", 5)
    assert got.get("shed") == 5, got
    assert len(primary.requests) == 5
    assert shadow.requests == []


def test_in_flight_watermarks_shed_then_refuse_with_503_and_recover(
    proxy_factory: ProxyFactory, backends: Callable[..., RecordingBackend]
) -> None:
    """in_flight: shed_shadows 1, refuse 3. One slow request in flight: shadows shed, clients
    served. Three: new requests get 503 + Retry-After, never reaching a backend. When they
    finish: back to normal."""
    primary, shadow = backends(), backends()
    proxy = proxy_factory(
        _shadowed(
            primary,
            shadow,
            overload={"in_flight": {"shed_shadows": 1, "refuse": 3}, "retry_after": "2s"},
        )
    )
    level = lambda: scrape(proxy).sum("shadowlane_overload_level")  # noqa: E731
    slow = [connect(proxy) for _ in range(3)]
    try:
        slow[0].sendall(b"GET /delay/4 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: level() == 1, T, "level shed with one request in flight")
        base = scrape(proxy).outcomes("r1", "s")
        with connect(proxy) as sock:
            sock.sendall(b"GET /while-shedding HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_http_response(sock, timeout=T).status == 200
        assert settle(proxy, "r1", "s", 1, since=base).get("shed") == 1
        assert "/while-shedding" not in [r.path for r in shadow.requests]

        for sock in slow[1:]:
            sock.sendall(b"GET /delay/4 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: level() == 2, T, "level refuse with three requests in flight")
        seen = len(primary.requests)
        with connect(proxy) as sock:
            sock.sendall(b"GET /while-refusing HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = read_http_response(sock, timeout=T)
        assert resp.status == 503
        assert resp.header("retry-after") == "2"
        assert resp.header("connection") == "close"
        assert limited(proxy, "overload") == 1
        assert "/while-refusing" not in [r.path for r in primary.requests[seen:]]
        # the requests in flight still finish
        for sock in slow:
            assert read_http_response(sock, timeout=10).status == 200
    finally:
        for sock in slow:
            sock.close()
    wait_until(lambda: level() == 0, T, "level back to normal")
    with connect(proxy) as sock:
        sock.sendall(b"GET /recovered HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_http_response(sock, timeout=T).status == 200
    wait_until(lambda: "/recovered" in [r.path for r in shadow.requests], T, "copies sent again")
