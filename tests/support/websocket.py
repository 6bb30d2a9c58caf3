"""A real WebSocket server (the `websockets` package) on its own thread, for the upgrade tests.

Why `websockets` and not a hand-written frame parser: the tests judge whether the proxy carries
what a real server and client exchange (the handshake's `Sec-WebSocket-Accept`, masking, ping
and pong, fragmented and 10 MB messages, close codes) and a library that implements RFC 6455
checks every byte of it on both ends.

The server's behaviour is chosen by the request path:

- ``/echo``: sends back every message (text as text, binary as binary).
- ``/greet``: sends ``hello`` right after the handshake (often in the same segment as the
  ``101``), then echoes.
- ``/close/CODE``: closes at once with ``CODE`` and the reason ``bye``.
- ``/flood/N``: sends ``N`` bytes in 1 MiB binary messages, then ``done`` as text, and echoes.
- ``/deny``: answers the handshake ``403`` with a body (no upgrade).
- ``/silent``: accepts and never sends (idle timeout tests).

Every handshake is recorded (:attr:`WebSocketServer.handshakes`: path and headers), so a test
can tell a shadow received one. Nothing here imports shadowlane.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import threading
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .servers import ServerThread, SocketServer

CHUNK = 1024 * 1024
MAX_MESSAGE = 32 * 1024 * 1024


class WebSocketServer(ServerThread):
    """``websockets.asyncio.server.serve`` on a loop of its own, on port 0."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Future[None] | None = None
        self._lock = threading.Lock()
        #: (path, headers) of every handshake, in arrival order
        self.handshakes: list[tuple[str, Headers]] = []
        #: connections open now (the handler is running)
        self.open = 0
        #: how each connection ended: the close code the server saw (None: no close frame)
        self.closes: list[int | None] = []
        #: flood bytes whose `send` completed (websockets waits while its buffer is full)
        self.flood_sent = 0

    scheme = "http"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = self.loop.create_future()
        server: Server
        async with serve(
            self._handler,
            self.host,
            0,
            process_request=self._process_request,
            max_size=MAX_MESSAGE,
            ping_interval=None,
        ) as server:
            self._port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop

    def _wake(self) -> None:
        def stop() -> None:
            if self._stop is not None and not self._stop.done():
                self._stop.set_result(None)

        self.loop.call_soon_threadsafe(stop)

    def _release(self, timeout: float) -> None:
        if not self.loop.is_running():
            self.loop.close()

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        with self._lock:
            self.handshakes.append((request.path, request.headers))
        if request.path == "/deny":
            return conn.respond(HTTPStatus.FORBIDDEN, "denied by the backend\n")
        return None

    def handshake_paths(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self.handshakes]

    async def _handler(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else ""
        with self._lock:
            self.open += 1
        try:
            await self._serve_path(ws, path)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self.open -= 1
                self.closes.append(ws.close_code)

    async def _serve_path(self, ws: ServerConnection, path: str) -> None:
        if path.startswith("/close/"):
            await ws.close(int(path.rsplit("/", 1)[1]), "bye")
            return
        if path == "/silent":
            await ws.wait_closed()
            return
        if path == "/greet":
            await ws.send("hello")
        elif path.startswith("/flood/"):
            left = int(path.rsplit("/", 1)[1])
            block = bytes(range(256)) * (CHUNK // 256)
            while left > 0:
                n = min(left, CHUNK)
                await ws.send(block[:n])
                left -= n
                self.flood_sent += n
            await ws.send("done")
        message: Any
        async for message in ws:
            await ws.send(message)


class StalledUpgradeServer(SocketServer):
    """Accepts one WebSocket handshake (a valid `101`) on a plain socket, then reads nothing
    until :meth:`release`, then counts every byte until the peer closes: a backend that is a
    slow reader, for the client-to-backend direction of back-pressure."""

    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self) -> None:
        super().__init__()
        self._go = threading.Event()
        self.received = 0
        self.finished = threading.Event()

    def release(self) -> None:
        self._go.set()

    def handle(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + self.GUID).digest())
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self._go.wait(60)
        while True:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            with self._cond:
                self.received += len(chunk)
        self.finished.set()


__all__ = ["CHUNK", "MAX_MESSAGE", "StalledUpgradeServer", "WebSocketServer"]
