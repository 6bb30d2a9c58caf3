"""A closed connection is freed by reference counting, not left for the cyclic GC.

httptools' parsers keep the bound methods of the protocol they call back, and the protocol
keeps its parser: each connection was a cycle of ~45 objects (with its transport, socket and
context) that only a collection of the old generation freed. After a burst of 1,000 clients
those collections took 80-170 ms on the loop, in the middle of the next burst's requests.
Closed, a connection now swaps its parser for an inert one.

HTTP/2 connections had the same cycle through their send scheduler's bound methods; closed,
the scheduler lets go of them.

The tests turn the automatic collector off, open and close real connections on uvloop, and
wait for the instances to be gone: with the cycle still there they never go, and the wait
fails. Nothing calls `gc.collect()` between the close and the check.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Iterator

import pytest

from inproc import endpoint, head, lane_to, run, until
from shadowlane.shadow.lane import ShadowCopy, ShadowResult
from shadowlane.wire.exchange import Exchange
from shadowlane.wire.h2_server import H2Listener, H2ServerConnection
from shadowlane.wire.messages import EMPTY_BODY
from shadowlane.wire.server import ServerConnection, ServerLimits, ServerState
from shadowlane.wire.upstream import UpstreamConnection, UpstreamError
from support.backend import RecordingBackend, dead_port
from support.h2 import H2Client

LOOPBACK = "127.0.0.1"
#: connections per test: enough that a leak is not one stray object
N = 40


@pytest.fixture(autouse=True)
def no_automatic_gc() -> Iterator[None]:
    """Only reference counting may free what the test closes (older garbage goes first)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _alive(cls: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is cls)


class Echo:
    def __init__(self) -> None:
        self.handled = 0

    def handle(self, exchange: Exchange) -> None:
        self.handled += 1
        exchange.start_response(200, b"OK", [(b"content-type", b"text/plain")], 2)
        exchange.send_body(b"ok")
        exchange.end_response()


def _one_request(port: int) -> None:
    with socket.create_connection((LOOPBACK, port), timeout=5) as c:
        c.sendall(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        data = b""
        while not data.endswith(b"ok"):
            chunk = c.recv(4096)
            assert chunk, data
            data += chunk


def _one_h2_request(port: int) -> None:
    """One GET over HTTP/2 (prior knowledge), answered, then the connection closed."""
    with H2Client(LOOPBACK, port, timeout=5) as c:
        answer = c.request(b"GET", b"/")
    assert (answer.status, answer.body) == (200, b"ok")


@pytest.mark.parametrize("protocol", ["http1", "http2"])
def test_closed_client_connections_are_freed_without_the_collector(protocol: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        app = Echo()
        limits = ServerLimits()
        state = ServerState(app, limits)
        listener = H2Listener(app, limits, state)
        factory, request, cls, connections = (
            (state.protocol_factory, _one_request, ServerConnection, state.connections)
            if protocol == "http1"
            else (listener.protocol_factory, _one_h2_request, H2ServerConnection,
                  listener.connections)
        )  # fmt: skip
        server = await loop.create_server(factory, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        before = _alive(cls)
        try:
            for _ in range(N):
                await loop.run_in_executor(None, request, port)
            assert app.handled == N
            await until(lambda: not connections, what="every connection lost")
            await until(
                lambda: _alive(cls) == before,
                what=f"the {N} closed connections freed ({_alive(cls)} alive)",
            )
        finally:
            server.close()
            listener.close()
            state.close()

    run(main)


def test_closed_upstream_connections_are_freed_without_the_collector() -> None:
    """Connections that carried an exchange and were closed (max_idle 0 keeps none), and
    connects that failed: neither is left for the collector."""

    async def main() -> None:
        before = _alive(UpstreamConnection)
        with RecordingBackend() as backend:
            ep = endpoint(backend.port, max_idle=0)
            lane = lane_to(ep, max_in_flight=N, queue=0)
            ended: list[ShadowResult] = []

            def done(_copy: ShadowCopy, result: ShadowResult) -> None:
                ended.append(result)

            for i in range(N):
                assert lane.submit(ShadowCopy(lane, "GET", head("GET", f"/c{i}"), EMPTY_BODY, done))
            await until(lambda: len(ended) == N, what="every copy answered")
            assert [r.outcome for r in ended] == ["ok"] * N
            assert len(backend.requests) == N
            await until(lambda: ep.open == 0, what="every connection closed")
            await until(
                lambda: _alive(UpstreamConnection) == before,
                what=f"the closed connections freed ({_alive(UpstreamConnection)} alive)",
            )
        refused = endpoint(dead_port())
        for _ in range(N):
            with pytest.raises(UpstreamError):
                await refused.connect()
        assert refused.open == 0
        await until(
            lambda: _alive(UpstreamConnection) == before,
            what=f"the failed connects freed ({_alive(UpstreamConnection)} alive)",
        )

    run(main)
