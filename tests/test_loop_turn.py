"""The HTTP/1.1 server's turn budget (`wire.server.READERS_PER_TURN`), on real sockets and uvloop.

libuv polls again, without running timers or `call_soon` callbacks, for as long as
`epoll_wait` comes back full, up to 48 times; at 1,000 busy clients that starved the loop's
ready queue for up to 1.5 s (new connections, pool connects, shadow dispatch and timeouts all
waited). Past the budget the server holds the connections that read until the queue has run.
The tests that make one poll return more readers than the budget write their requests from
the loop's own thread (or freeze the proxy), so the loop cannot poll until all of them are in
the sockets; the others check that uploads and small loads are never held.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator

import pytest

from inproc import run, until
from shadowlane.wire.exchange import Exchange
from shadowlane.wire.server import READERS_PER_TURN, App, ServerLimits, ServerState
from support.backend import RecordingBackend
from support.configs import basic_config
from support.metrics import scrape
from support.proxy import ProxyFactory, ProxyProcess, read_http_response
from support.wait import wait_until

LOOPBACK = "127.0.0.1"
#: clients in one poll: past the budget, and below libuv's 1,024 events per poll
CLIENTS = READERS_PER_TURN + 100


class Echo:
    """Answers every request at once with its target, so each answer names its request."""

    def __init__(self) -> None:
        self.handled = 0

    def handle(self, exchange: Exchange) -> None:
        self.handled += 1
        body = exchange.request.target
        exchange.start_response(200, b"OK", [(b"content-type", b"text/plain")], len(body))
        exchange.send_body(body)
        exchange.end_response()


@pytest.fixture(autouse=True)
def enough_descriptors() -> None:
    """Both ends of every connection live in this process: about 2.5 descriptors a client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * CLIENTS + 256
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _read_answer(sock: socket.socket, want: bytes) -> None:
    """One whole answer on a blocking socket (the answers are already in its buffer)."""
    data = b""
    while not data.endswith(b"\r\n\r\n" + want):
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before the answer to {want!r}: {data!r}"
        data += chunk
        assert len(data) < 4096, data
    assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data


async def _send_round(clients: list[socket.socket], app: Echo, rnd: int) -> None:
    """Every client sends one request, from the loop's thread, so the loop polls only once all
    of them are in the sockets; returns when the app has served them all."""
    before = app.handled
    for i, c in enumerate(clients):
        c.sendall(b"GET /%d/%d HTTP/1.1\r\nhost: t\r\n\r\n" % (rnd, i))
    await until(
        lambda: app.handled == before + len(clients),
        timeout=20,
        what=f"round {rnd}: every request served",
    )


def _read_round(clients: list[socket.socket], rnd: int) -> None:
    for i, c in enumerate(clients):
        _read_answer(c, b"/%d/%d" % (rnd, i))


@contextlib.asynccontextmanager
async def _serving(
    app: App, n: int = 0
) -> AsyncIterator[tuple[ServerState, int, list[socket.socket]]]:
    """`app` behind the HTTP/1.1 server on port 0: its state, its port and `n` blocking client
    sockets, all taken in."""
    loop = asyncio.get_running_loop()
    state = ServerState(app, ServerLimits())
    server = await loop.create_server(state.protocol_factory, LOOPBACK, 0, backlog=2048)
    port = server.sockets[0].getsockname()[1]
    clients: list[socket.socket] = []
    try:
        for _ in range(n):
            clients.append(socket.create_connection((LOOPBACK, port), timeout=5))
        await until(lambda: len(state.connections) == n, timeout=20, what="all connected")
        yield state, port, clients
    finally:
        for c in clients:
            c.close()
        server.close()
        state.close()


def test_reads_past_the_budget_are_held_then_served_with_nothing_lost() -> None:
    async def main() -> None:
        app = Echo()
        async with _serving(app, CLIENTS) as (state, _port, clients):
            for rnd in (1, 2):
                before_holds = state.holds
                await _send_round(clients, app, rnd)
                # one poll brought every read: those past the budget were held ...
                assert state.holds - before_holds == CLIENTS - READERS_PER_TURN
                # ... and the loop's next turn let them read again
                await until(lambda: not state.held, timeout=5, what="held connections resumed")
                _read_round(clients, rnd)
            # round 2 was read at all only because round 1's held connections were resumed
            assert app.handled == 2 * CLIENTS

    run(main, timeout=60)


def test_a_loop_that_reads_less_than_the_budget_holds_nothing() -> None:
    """The common case pays two integers per read: no connection is ever paused for it."""

    async def main() -> None:
        app = Echo()
        async with _serving(app, 50) as (state, _port, clients):
            for rnd in range(20):
                await _send_round(clients, app, rnd)
                _read_round(clients, rnd)
            assert app.handled == 1000
            assert state.holds == 0

    run(main, timeout=60)


class Sink:
    """Reads every body to its end and answers with its length."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def handle(self, exchange: Exchange) -> None:
        got: list[int] = [0]

        def chunk(data: bytes) -> None:
            got[0] += len(data)

        def end() -> None:
            self.sizes.append(got[0])
            body = b"%d" % got[0]
            exchange.start_response(200, b"OK", [], len(body))
            exchange.send_body(body)
            exchange.end_response()

        exchange.set_body_consumer(chunk, end)


def test_uploads_are_not_held_for_their_many_reads() -> None:
    """A turn counts connections, not reads: a few clients uploading at full speed are dozens
    of reads each per turn, and holding them would only slow the uploads down."""
    uploads, size = 16, 16 * 1024 * 1024

    async def main() -> None:
        app = Sink()
        body = b"x" * size
        head = b"POST /u HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % size
        async with _serving(app) as (state, port, _clients):

            def upload() -> bytes:
                with socket.create_connection((LOOPBACK, port), timeout=20) as c:
                    c.sendall(head + body)
                    answer = b""
                    while not answer.endswith(b"\r\n\r\n%d" % size):
                        chunk = c.recv(4096)
                        if not chunk:
                            break
                        answer += chunk
                    return answer

            answers = await asyncio.gather(*(asyncio.to_thread(upload) for _ in range(uploads)))
            assert app.sizes == [size] * uploads
            assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers), answers
            assert state.holds == 0

    run(main, timeout=60)


def test_a_frozen_proxy_woken_by_600_clients_holds_past_the_budget_and_counts_it(
    proxy_factory: ProxyFactory, backend: RecordingBackend
) -> None:
    """The whole proxy: stopped (SIGSTOP) while every client sends, it wakes to one poll with
    all of them ready, as a saturated loop would; every request is answered and the holds are
    in `/metrics`."""
    config = basic_config(backend.url)
    # the backend's asyncio server listens with a backlog of 100: 600 connects at once
    # overflow it, and a dropped SYN is sent again after 1 s
    config["backends"]["b1"]["connect_timeout"] = "10s"
    proxy: ProxyProcess = proxy_factory(config)
    assert proxy.proc is not None
    pid = proxy.proc.pid
    clients = [socket.create_connection((LOOPBACK, proxy.port), timeout=10) for _ in range(CLIENTS)]
    try:
        wait_until(
            lambda: scrape(proxy).sum("shadowlane_downstream_connections") == CLIENTS,
            15,
            "every client connection taken in",
        )
        assert scrape(proxy).sum("shadowlane_loop_turn_holds") == 0
        os.kill(pid, signal.SIGSTOP)
        try:
            for i, c in enumerate(clients):
                c.sendall(b"GET /frozen/%d HTTP/1.1\r\nhost: t\r\n\r\n" % i)
        finally:
            os.kill(pid, signal.SIGCONT)
        for c in clients:
            assert read_http_response(c, timeout=20).status == 200
        paths = sorted(r.path for r in backend.requests if r.path.startswith("/frozen/"))
        assert paths == sorted(f"/frozen/{i}" for i in range(CLIENTS))
        holds = scrape(proxy).sum("shadowlane_loop_turn_holds")
        assert 0 < holds <= CLIENTS - READERS_PER_TURN, holds
    finally:
        for c in clients:
            c.close()
