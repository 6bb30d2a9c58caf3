"""An upstream connection's life cycle, in process, on real loopback sockets.

CONNECTING -> NEW -> BUSY <-> IDLE, and CLOSED from any of them, with the pool's count of
open connections (what `max_connections` bounds) following every way in and out exactly once.
The servers are support.backend's (h11 on their own thread); the connection is driven by a real
ShadowCopy (see inproc.py).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from typing import get_args

import pytest

from inproc import Copy, endpoint, head, lane_to, run, syn_sent_to, until
from shadowlane.config import BackendConfig
from shadowlane.proxy import gateway_status
from shadowlane.routing import build_backend, build_shadow_backend
from shadowlane.shadow.outcomes import ERROR, OK, TIMEOUT
from shadowlane.wire.upstream import (
    POOL_PURGE_DELAY,
    SHADOW_POOL_PURGE_DELAY,
    ConnState,
    UpstreamConnection,
    UpstreamError,
    UpstreamErrorKind,
)
from support.backend import (
    FullBacklog,
    Recorded,
    RecordingBackend,
    Reply,
    dead_port,
    default_handler,
)

#: paths under /drop-once/ already dropped once
_dropped: set[str] = set()


def handler(req: Recorded) -> Reply:
    if req.path.startswith("/drop-once/"):
        if req.path in _dropped:
            return default_handler(req)
        _dropped.add(req.path)
        return Reply(action="close")
    if req.path.startswith("/close"):
        return Reply(body=b"bye", headers=[("Connection", "close")])
    if req.path.startswith("/drop"):
        return Reply(action="close")  # closes without a byte of answer
    if req.path.startswith("/reset"):
        return Reply(body=b"partial", action="reset_mid_body")
    return default_handler(req)


@pytest.fixture(scope="module")
def server() -> Iterator[RecordingBackend]:
    with RecordingBackend(handler) as b:
        yield b
    assert b.errors == []


@pytest.fixture
def full_backlog() -> Iterator[FullBacklog]:
    target = FullBacklog()
    yield target
    target.close()


def test_every_error_kind_has_a_gateway_status() -> None:
    statuses = {kind: gateway_status(kind) for kind in get_args(UpstreamErrorKind)}
    assert statuses == {
        "refused": 502,
        "timeout": 504,
        "tls": 502,
        "overflow": 503,
        "reset": 502,
        "protocol": 502,
    }


def test_connect_makes_a_new_connection_counted_from_its_handshake(
    server: RecordingBackend,
) -> None:
    async def main() -> None:
        ep = endpoint(server.port)
        conn = UpstreamConnection(ep)
        assert conn.state == ConnState.CONNECTING and conn.state_name == "connecting"
        assert ep.open == 1  # the handshake holds a slot
        await conn.open()
        assert conn.state == ConnState.NEW and conn.exchanges == 0
        assert not ep.idle and ep.get_idle() is None  # NEW belongs to whoever asked
        conn.close()
        assert conn.state == ConnState.CLOSED and ep.open == 0
        conn.close()  # a second close (and the loss that follows) counts nothing
        await asyncio.sleep(0.05)
        assert ep.open == 0
        fresh = await ep.connect()
        assert fresh.state == ConnState.NEW and ep.open == 1
        fresh.close()

    run(main)


def test_busy_then_idle_in_the_pool_then_reused(server: RecordingBackend) -> None:
    async def main() -> None:
        ep = endpoint(server.port)
        lane = lane_to(ep)
        first = Copy(lane, "/delay/0.3")
        lane.submit(first.copy)
        await until(lambda: first.copy.conn is not None, what="connected")
        conn = first.copy.conn
        assert conn is not None
        assert conn.state == ConnState.BUSY and conn.exchanges == 1
        assert ep.open == 1 and not ep.idle
        assert (await first.ended).outcome == OK
        assert conn.state == ConnState.IDLE and list(ep.idle) == [conn] and ep.open == 1

        second = Copy(lane, "/again")
        lane.submit(second.copy)
        assert second.copy.conn is conn  # taken from the pool synchronously
        assert conn.state == ConnState.BUSY and conn.exchanges == 2 and not ep.idle
        assert (await second.ended).outcome == OK
        assert conn.state == ConnState.IDLE and list(ep.idle) == [conn]
        ep.close()
        assert conn.state == ConnState.CLOSED and ep.open == 0

    run(main)


def test_a_burst_past_max_idle_is_kept_then_halved_each_purge_delay(
    server: RecordingBackend,
) -> None:
    """Five connections released at once into a pool keeping one idle: all five stay for the
    next requests of the burst, then each `purge_delay` closes the older half of those past
    `max_idle` (2 of 4, 1 of 2, 1 of 1), never the warmest, down to `max_idle`."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ep = endpoint(server.port, max_idle=1)
        assert ep.purge_delay == POOL_PURGE_DELAY
        ep.purge_delay = delay = 0.3  # the default's 5 s, shortened for the test
        lane = lane_to(ep, max_in_flight=5)
        copies = [Copy(lane, f"/delay/0.2?n={i}") for i in range(5)]
        for c in copies:
            lane.submit(c.copy)
        for c in copies:
            assert (await c.ended).outcome == OK
        released = loop.time()
        conns = [c.copy.conn for c in copies]
        assert len({id(c) for c in conns}) == 5 and ep.open == 5
        assert len(ep.idle) == 5  # past max_idle, kept
        warmest = ep.idle[-1]
        again = Copy(lane, "/again")
        lane.submit(again.copy)
        assert again.copy.conn is warmest  # the burst's next request reuses one
        assert (await again.ended).outcome == OK
        oldest_first = list(ep.idle)
        for n, left in enumerate((3, 2, 1), 1):
            await until(lambda k=left: len(ep.idle) == k, timeout=delay + 5, what=f"{left} left")
            assert loop.time() - released >= n * delay * 0.9
            assert list(ep.idle) == oldest_first[-left:]  # the least recently used went first
        assert list(ep.idle) == [warmest] and warmest.state == ConnState.IDLE
        await until(lambda: ep.open == 1, what="the purged ones closed")
        assert sum(c is not None and c.state == ConnState.CLOSED for c in conns) == 4
        await asyncio.sleep(delay * 2)  # bounded: nothing more is closed below max_idle
        assert ep.open == 1 and list(ep.idle) == [warmest]
        ep.close()

    run(main)


def test_max_idle_zero_keeps_nothing(server: RecordingBackend) -> None:
    async def main() -> None:
        ep = endpoint(server.port, max_idle=0)
        lane = lane_to(ep)
        c = Copy(lane, "/once")
        lane.submit(c.copy)
        assert (await c.ended).outcome == OK
        conn = c.copy.conn
        assert conn is not None and conn.state == ConnState.CLOSED and not ep.idle
        await until(lambda: ep.open == 0, what="closed")

    run(main)


def test_an_answer_without_keep_alive_closes_it(server: RecordingBackend) -> None:
    async def main() -> None:
        ep = endpoint(server.port)
        lane = lane_to(ep)
        c = Copy(lane, "/close")
        lane.submit(c.copy)
        assert (await c.ended).outcome == OK
        conn = c.copy.conn
        assert conn is not None and conn.state == ConnState.CLOSED
        assert not ep.idle and ep.open == 0

    run(main)


async def short_keep_alive(linger: float) -> tuple[asyncio.Server, int]:
    """A server that answers one request per connection with keep-alive, then closes the
    connection `linger` seconds later (a backend with a short keep-alive timeout)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(linger)
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port: int = srv.sockets[0].getsockname()[1]
    return srv, port


def test_a_server_closing_an_idle_connection_takes_it_out() -> None:
    async def main() -> None:
        srv, port = await short_keep_alive(0.05)
        ep = endpoint(port)
        lane = lane_to(ep)
        c = Copy(lane, "/first")
        lane.submit(c.copy)
        assert (await c.ended).outcome == OK
        conn = c.copy.conn
        assert conn is not None and conn.state == ConnState.IDLE and list(ep.idle) == [conn]
        await until(lambda: conn.state == ConnState.CLOSED, what="closed by the server")
        assert ep.open == 0
        assert ep.get_idle() is None  # dropped from the pool, and not counted out twice
        assert ep.open == 0
        srv.close()

    run(main)


def test_stale_reused_connection_is_retried_once_on_a_new_one(server: RecordingBackend) -> None:
    async def main() -> None:
        ep = endpoint(server.port)
        lane = lane_to(ep)
        c = Copy(lane, "/warm")
        lane.submit(c.copy)
        assert (await c.ended).outcome == OK
        stale = c.copy.conn
        assert stale is not None and stale.state == ConnState.IDLE
        # reused, and closed before a byte of answer (the keep-alive race): retried, fresh
        d = Copy(lane, "/drop-once/stale")
        lane.submit(d.copy)
        assert d.copy.conn is stale
        assert (await d.ended).outcome == OK
        assert stale.state == ConnState.CLOSED and stale.exchanges == 2
        fresh = d.copy.conn
        assert fresh is not None and fresh is not stale
        assert fresh.exchanges == 1 and fresh.state == ConnState.IDLE
        assert ep.open == 1

    run(main)


def test_a_fresh_connection_closed_before_the_answer_is_not_retried(
    server: RecordingBackend,
) -> None:
    async def main() -> None:
        ep = endpoint(server.port)
        lane = lane_to(ep)
        c = Copy(lane, "/drop")
        lane.submit(c.copy)
        assert (await c.ended).outcome == ERROR
        conn = c.copy.conn
        assert conn is not None and conn.state == ConnState.CLOSED and conn.exchanges == 1
        assert ep.open == 0

    run(main)


def test_reset_mid_body_closes_it(server: RecordingBackend) -> None:
    async def main() -> None:
        ep = endpoint(server.port)
        lane = lane_to(ep)
        c = Copy(lane, "/reset")
        lane.submit(c.copy)
        assert (await c.ended).outcome == ERROR
        conn = c.copy.conn
        assert conn is not None and conn.state == ConnState.CLOSED and ep.open == 0

    run(main)


def test_refused_connect_ends_closed_and_uncounted() -> None:
    async def main() -> None:
        ep = endpoint(dead_port())
        conn = UpstreamConnection(ep)
        with pytest.raises(UpstreamError) as err:
            await conn.open()
        assert err.value.kind == "refused"
        assert conn.state == ConnState.CLOSED and ep.open == 0

    run(main)


def test_connect_timeout_ends_closed_and_uncounted(full_backlog: FullBacklog) -> None:
    async def main() -> None:
        port = full_backlog.port
        fillers = syn_sent_to(port)  # the backlog's own last connect stays pending too
        ep = endpoint(port, connect_timeout=0.2)
        conn = UpstreamConnection(ep)
        with pytest.raises(UpstreamError) as err:
            await conn.open()
        assert err.value.kind == "timeout"
        assert conn.state == ConnState.CLOSED and ep.open == 0
        await until(lambda: syn_sent_to(port) == fillers, what="the socket closed")

    run(main)


def test_cancelled_connect_frees_its_slot_and_its_socket(full_backlog: FullBacklog) -> None:
    async def main() -> None:
        port = full_backlog.port
        fillers = syn_sent_to(port)  # the backlog's own last connect stays pending too
        ep = endpoint(port, connect_timeout=30.0)
        conn = UpstreamConnection(ep)
        task = asyncio.get_running_loop().create_task(conn.open())
        await until(lambda: syn_sent_to(port) == fillers + 1, what="our SYN in flight")
        assert conn.state == ConnState.CONNECTING and ep.open == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert conn.state == ConnState.CLOSED and ep.open == 0
        await until(lambda: syn_sent_to(port) == fillers, what="the socket closed")

    run(main)


def test_overflow_when_every_connection_stays_busy(server: RecordingBackend) -> None:
    async def main() -> None:
        ep = endpoint(server.port, connect_timeout=0.2, max_connections=1)
        lane = lane_to(ep, timeout=5.0)
        busy = Copy(lane, "/delay/1")
        lane.submit(busy.copy)
        await until(lambda: busy.copy.conn is not None, what="connected")
        with pytest.raises(UpstreamError) as err:
            await ep.acquire()
        assert err.value.kind == "overflow"
        assert ep.open == 1
        assert (await busy.ended).outcome == OK

    run(main)


def test_no_answer_within_the_timeout_closes_it(server: RecordingBackend) -> None:
    async def main() -> None:
        ep = endpoint(server.port)
        lane = lane_to(ep, timeout=0.2)
        c = Copy(lane, "/delay/2")
        lane.submit(c.copy)
        assert (await c.ended).outcome == TIMEOUT
        conn = c.copy.conn
        assert conn is not None and conn.state == ConnState.CLOSED and ep.open == 0

    run(main)


def test_a_copy_whose_deadline_passes_mid_connect_gives_up_the_connect(
    full_backlog: FullBacklog,
) -> None:
    """A target that drops SYNs: each copy's deadline (0.2 s) passes while it connects. The
    lane frees the copy's slot then, so the connect must end then too, not at connect_timeout
    (10 s): otherwise every slot freed adds a half-open socket, beyond max_in_flight."""

    async def main() -> None:
        port = full_backlog.port
        fillers = syn_sent_to(port)
        ep = endpoint(port, connect_timeout=10.0, max_connections=64)
        lane = lane_to(ep, timeout=0.2, max_in_flight=2, queue=16)
        copies = [Copy(lane, f"/c{i}") for i in range(6)]
        for c in copies:
            assert lane.submit(c.copy)
        peak_open = peak_half_open = 0
        while not all(c.ended.done() for c in copies):
            peak_open = max(peak_open, ep.open)
            peak_half_open = max(peak_half_open, syn_sent_to(port) - fillers)
            await asyncio.sleep(0.01)
        assert [c.ended.result().outcome for c in copies] == [TIMEOUT] * 6
        assert peak_open <= 2 and peak_half_open <= 2
        await until(lambda: ep.open == 0, timeout=1.0, what="every connect given up")
        await until(lambda: syn_sent_to(port) == fillers, timeout=1.0, what="sockets closed")
        assert all(c.copy.connecting is None for c in copies)

    run(main)


def test_a_connection_closed_before_the_request_is_written_reports_instead_of_raising() -> None:
    """The peer resets a new connection between the handshake and the first write (a chaos
    shadow that resets at accept): sending on it must report an error to the sink (from the
    loop), not raise from the closed transport, and must not put it back in the pool."""

    async def main() -> None:
        loop = asyncio.get_running_loop()

        class Reset(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()

        srv = await loop.create_server(Reset, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        ep = endpoint(port)
        lane = lane_to(ep)
        conn = await ep.connect()
        await until(lambda: conn.state == ConnState.CLOSED, what="reset by the server")
        c = Copy(lane, "/never-sent")
        c.copy.retried = True  # its one retry is spent: the error ends it
        conn.send_request(head("GET", "/never-sent"), c.copy, 2.0)
        conn.end_request()
        assert (await c.ended).outcome == ERROR
        assert conn.state == ConnState.CLOSED
        assert ep.get_idle() is None and ep.open == 0
        srv.close()

    run(main)


def test_a_shadow_lanes_pool_fades_its_surplus_faster_than_the_primarys(
    server: RecordingBackend,
) -> None:
    """Copies past a shadow's `max_idle` pay a connect, which paces a lane while the primary
    takes in a burst (see `SHADOW_POOL_PURGE_DELAY`); the primary keeps a burst's warm."""

    async def main() -> None:
        cfg = BackendConfig(endpoints=[server.url])
        primary = build_backend("b", cfg)
        shadow = build_shadow_backend("b", cfg)
        assert [ep.purge_delay for ep in primary.endpoints] == [POOL_PURGE_DELAY]
        assert [ep.purge_delay for ep in shadow.endpoints] == [SHADOW_POOL_PURGE_DELAY]
        assert SHADOW_POOL_PURGE_DELAY < POOL_PURGE_DELAY
        primary.close()
        shadow.close()

    run(main)
