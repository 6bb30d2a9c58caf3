"""The proxy's own accept loop (wire/listener.py), on real loopback sockets and uvloop.

libuv accepts one connection per loop iteration; under load an iteration is long, so a wave of
new clients waited one busy iteration each (the bench's 1,000-connection row: first requests
answered after 1-4 s). These tests keep the loop busy on purpose and count iterations, not
seconds, so they hold on a slow machine too.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import cast

from inproc import run, until
from shadowlane.wire.listener import ACCEPT_BATCH, Listener, bind_sockets

LOOPBACK = "127.0.0.1"


class Hello(asyncio.Protocol):
    """Says `hi` on connect, so the client sees that its connection was taken."""

    made: list[int]
    iteration: list[int]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(self.iteration[0])
        # uvloop's transports implement asyncio.Transport without subclassing it
        cast(asyncio.Transport, transport).write(b"hi")


def test_a_wave_of_connections_is_taken_in_a_few_busy_iterations() -> None:
    wave = 300

    async def main() -> None:
        loop = asyncio.get_running_loop()
        socks = bind_sockets(LOOPBACK, 0, reuse_port=False, backlog=1024)
        assert len(socks) == 1
        port = socks[0].getsockname()[1]
        made: list[int] = []
        iteration = [0]

        def factory() -> Hello:
            p = Hello()
            p.made, p.iteration = made, iteration
            return p

        listener = Listener(loop, socks, factory)
        listener.start()
        busy = True

        def spin() -> None:
            # one busy loop iteration: 2 ms of work, as a loaded proxy's iteration has
            iteration[0] += 1
            end = time.perf_counter() + 0.002
            while time.perf_counter() < end:
                pass
            if busy:
                loop.call_soon(spin)

        clients: list[socket.socket] = []
        try:
            # the kernel completes each handshake into the backlog: a blocking connect from the
            # loop's thread does not need the loop
            for _ in range(wave):
                clients.append(socket.create_connection((LOOPBACK, port), timeout=5))
            spin()
            start = iteration[0]
            await until(lambda: len(made) == wave, timeout=15, what=f"{wave} accepted")
            busy = False
            taken_in = max(made) - start
            # libuv alone: one connection per iteration (about `wave` iterations)
            assert taken_in <= 2 * (wave // ACCEPT_BATCH + 1) + 4, taken_in
            for c in clients:
                c.settimeout(5)
                assert c.recv(2) == b"hi"
        finally:
            busy = False
            listener.close()
            for c in clients:
                c.close()
        assert all(s.fileno() == -1 for s in socks)

    run(main)


def test_close_stops_accepting_and_keeps_accepted_connections() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        socks = bind_sockets(LOOPBACK, 0, reuse_port=False, backlog=16)
        port = socks[0].getsockname()[1]
        made: list[int] = []
        transports: list[asyncio.BaseTransport] = []

        class Keep(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.append(0)
                transports.append(transport)

        listener = Listener(loop, socks, Keep)
        listener.start()
        first = socket.create_connection((LOOPBACK, port), timeout=5)
        try:
            await until(lambda: len(made) == 1, what="the first accepted")
            listener.close()
            try:
                late = socket.create_connection((LOOPBACK, port), timeout=1)
            except OSError:
                pass  # refused: nothing listens any more
            else:
                late.close()
                raise AssertionError("a closed listener still took a connection")
            assert not transports[0].is_closing()  # the accepted one lives on
        finally:
            first.close()
            for t in transports:
                t.close()

    run(main)
