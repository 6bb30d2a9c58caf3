"""The access log: one JSON line per request, to stdout or a file of its own.

It is called by the proxy once per answered request, so a line must cost one buffered write and
nothing else: the flush waits for a timer (once a second, and at exit) rather than happening
per line, and a line still reaches a file or a pipe within about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import IO, Any

import orjson

from shadowlane.wire.messages import Request

__all__ = ["AccessLogger"]


class AccessLogger:
    """The proxy's `AccessLog`; `target` is `True` or "-" for stdout, else a file path (kept
    open, appended to, closed with the instance)."""

    FLUSH_EVERY = 1.0

    def __init__(self, target: bool | str) -> None:
        self._own = False
        self.out: IO[bytes]
        if target is True or target == "-":
            self.out = sys.stdout.buffer
        else:
            self.out = open(str(target), "ab", buffering=65536)  # noqa: SIM115 - lives with the app
            self._own = True
        self._dirty = False
        self._timer: asyncio.TimerHandle | None = None

    def __call__(
        self,
        req: Request,
        route: str,
        backend: str,
        status: int,
        seconds: float,
        shadows: dict[str, str] | None,
    ) -> None:
        record: dict[str, Any] = {
            "ts": time.time(),
            "request_id": req.request_id,
            "client": req.client_addr,
            "method": req.method,
            "path": req.target.decode("latin-1"),
            "host": req.host,
            "route": route,
            "backend": backend,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
        }
        if shadows:
            record["shadows"] = shadows
        self.out.write(orjson.dumps(record) + b"\n")
        if not self._dirty:
            self._dirty = True
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.FLUSH_EVERY, self._tick)

    def tunnel(
        self,
        req: Request,
        route: str,
        backend: str,
        seconds: float,
        shadows: dict[str, str] | None,
        bytes_up: int,
        bytes_down: int,
        reason: str,
    ) -> None:
        """The line of an upgraded request, written when its tunnel closed: status 101, the
        duration from the handshake to the close, the bytes each way and who closed it."""
        record: dict[str, Any] = {
            "ts": time.time(),
            "request_id": req.request_id,
            "client": req.client_addr,
            "method": req.method,
            "path": req.target.decode("latin-1"),
            "host": req.host,
            "route": route,
            "backend": backend,
            "status": 101,
            "duration_ms": round(seconds * 1000, 3),
            "upgrade": {"bytes_up": bytes_up, "bytes_down": bytes_down, "closed_by": reason},
        }
        if shadows:
            record["shadows"] = shadows
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        self.out.write(orjson.dumps(record) + b"\n")
        if not self._dirty:
            self._dirty = True
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.FLUSH_EVERY, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._dirty:
            self._dirty = False
            self.flush()

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.out.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self._own:
            self.out.close()
