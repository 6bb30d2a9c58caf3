"""The proxy's listening sockets, accepted from by us rather than by libuv.

libuv accepts one connection per readiness of the listening socket since 1.45 (libuv PR 3696,
"don't accept() connections in a loop"), and uvloop's servers are libuv's. Under load one loop
iteration serves many connections and can take tens of milliseconds, so a wave of new clients
was let in one per iteration: with 1,000 connections opened at once, the last ones waited 1-4 s
in the kernel's accept queue before their first byte was read, and 50 connections uploading
1 MiB bodies waited a few hundred milliseconds. That was the p99 of the bench's
1,000-connection and 1 MiB rows. Here the readiness of a listening socket accepts everything
queued, up to `ACCEPT_BATCH` (nginx's `multi_accept on`), and hands each socket to the loop.

Out of descriptors (EMFILE, ENFILE) or kernel memory at accept, the listener pauses for
`ACCEPT_PAUSE` (nginx pauses 500 ms, Go backs off up to 1 s): the pending clients wait in the
backlog instead of being spun on, and the pause is counted. The `fd_reserve` limit of
`server.py` keeps that rare: connections past it are accepted and reset at once.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Callable
from typing import Final

#: connections accepted per readiness of a listening socket; the rest wait for the next
#: iteration (level-triggered), so a flood cannot keep the loop in accept
ACCEPT_BATCH: Final = 256
#: how long accepting stops when the process or the kernel is out of descriptors or memory
ACCEPT_PAUSE: Final = 0.1
_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def bind_sockets(host: str, port: int, *, reuse_port: bool, backlog: int) -> list[socket.socket]:
    """Listening sockets for `host:port`, one per address it resolves to, as
    `loop.create_server` binds them (SO_REUSEADDR, IPV6_V6ONLY on IPv6, SO_REUSEPORT when
    several workers share the port). Port 0 binds every address to the port the first got."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()  # getaddrinfo repeats an address per protocol
    try:
        for family, kind, proto, _name, addr in infos:
            key = (int(family), str(addr[0]))
            if key in seen:
                continue
            seen.add(key)
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class Listener:
    """Accepts on its sockets and gives each connection to the loop with the protocol
    `factory` makes (TLS first when `tls` is set)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        socks: list[socket.socket],
        factory: Callable[[], asyncio.BaseProtocol],
        *,
        tls: ssl.SSLContext | None = None,
        tls_shutdown_timeout: float | None = None,
        on_exhausted: Callable[[], None] | None = None,
    ) -> None:
        self.loop = loop
        self.sockets = socks
        self.factory = factory
        self.tls = tls
        self.tls_shutdown_timeout = tls_shutdown_timeout
        self.on_exhausted = on_exhausted
        self._serving = False
        self._closed = False
        #: the hand-overs under way (the loop keeps only weak references to tasks)
        self._adopting: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self._serving or self._closed:
            return
        self._serving = True
        for sock in self.sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and close the sockets; accepted connections live on."""
        if self._closed:
            return
        self._pause()
        self._closed = True
        for sock in self.sockets:
            sock.close()

    def _pause(self) -> None:
        if self._serving:
            self._serving = False
            for sock in self.sockets:
                self.loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as err:
                if err.errno not in _EXHAUSTED:
                    raise
                if self.on_exhausted is not None:
                    self.on_exhausted()
                self._pause()
                self.loop.call_later(ACCEPT_PAUSE, self.start)
                return
            conn.setblocking(False)
            task = self.loop.create_task(self._adopt(conn))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(
                self.factory,
                conn,
                ssl=self.tls,
                ssl_shutdown_timeout=self.tls_shutdown_timeout,
            )
        except OSError:
            # a TLS handshake that failed or timed out (SSLError and TimeoutError are
            # OSErrors), a client gone before its transport existed: nothing was read
            conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise
