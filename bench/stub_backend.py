"""Bench backends that nginx cannot play: `slow` (answers after a delay) and `hung`.

    python bench/stub_backend.py slow --delay 0.2 --ready-file out/slow.json
    python bench/stub_backend.py hung --port 9003

It listens on 127.0.0.1, by default on a port the kernel picks (`--port 0`); once it accepts
connections it writes `{"listen": "127.0.0.1:PORT", "pid": N}` to `--ready-file` (atomically:
a temporary file renamed into place), which is how the bench learns the port.

One uvloop process, asyncio Protocols and httptools: no task per request, only a timer, so it
holds thousands of connections and requests at once. `slow` speaks HTTP/1.1 with keep-alive
(answers in request order); `hung` accepts, reads and discards everything, never answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
from pathlib import Path
from typing import Any, cast

import httptools
import uvloop

BODY = b"ok slow\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
RESPONSE_CLOSE = RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)


class SlowProtocol(asyncio.Protocol):
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        self.loop.call_later(self.delay, self._answer, keep_alive)

    def _answer(self, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if keep_alive:
            transport.write(RESPONSE)
        else:
            transport.write(RESPONSE_CLOSE)
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class HungProtocol(asyncio.Protocol):
    """Accepts, reads (so the sender never blocks on a full socket), never answers."""

    def data_received(self, data: bytes) -> None:
        pass


def write_ready_file(path: Path, host: str, port: int) -> None:
    """Atomically: a reader sees no file or the whole JSON, never part of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"listen": f"{host}:{port}", "pid": os.getpid()}))
    os.replace(tmp, path)


async def serve(mode: str, port: int, delay: float, ready_file: Path | None) -> None:
    loop = asyncio.get_running_loop()
    factory: Any = (lambda: SlowProtocol(delay)) if mode == "slow" else HungProtocol
    server = await loop.create_server(factory, "127.0.0.1", port, backlog=4096)
    host, bound_port = server.sockets[0].getsockname()[:2]
    if ready_file is not None:
        write_ready_file(ready_file, host, bound_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["slow", "hung"])
    parser.add_argument("--port", type=int, default=0, help="0 (default): the kernel picks")
    parser.add_argument("--ready-file", type=Path, help="where to report the port once listening")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds (slow mode)")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(args.mode, args.port, args.delay, args.ready_file))


if __name__ == "__main__":
    main()
