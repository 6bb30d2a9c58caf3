"""Helpers for in-process tests of shadowlane's state machines (connections, lanes, tickets).

Unlike `support/`, which only ever drives the proxy from outside, these tests import the
modules under test and run them on a uvloop loop in the test's thread, against real loopback
servers (support.backend's, on their own threads). Nothing under test is replaced: a copy is a
real ShadowCopy on a real pool, and what the tests read is the state those objects keep.

Compiled classes cannot be subclassed from interpreted code, so the response sink used to
drive a connection is a ShadowCopy, the simplest real one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import uvloop

from shadowlane.metrics import Metrics
from shadowlane.shadow.lane import ShadowCopy, ShadowLane, ShadowResult
from shadowlane.wire.messages import EMPTY_BODY
from shadowlane.wire.upstream import BackendPool, EndpointPool
from support.procfs import LOOPBACK, socket_inodes

T = TypeVar("T")

#: the TCP state column of /proc/net/tcp for a connect in progress
SYN_SENT = "02"


def run(main: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """Run `main()` on a fresh uvloop loop (the proxy's loop), bounded by `timeout`."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout)

    return uvloop.run(bounded())


def endpoint(
    port: int,
    *,
    connect_timeout: float = 2.0,
    max_connections: int = 16,
    max_idle: int = 16,
) -> EndpointPool:
    """A pool to 127.0.0.1:`port` (call inside the loop: pools belong to one)."""
    return EndpointPool(
        "127.0.0.1",
        port,
        connect_timeout=connect_timeout,
        max_connections=max_connections,
        max_idle=max_idle,
    )


def lane_to(
    ep: EndpointPool,
    *,
    metrics: Metrics | None = None,
    timeout: float = 2.0,
    max_in_flight: int = 4,
    queue: int = 16,
    route: str = "r",
    target: str = "t",
) -> ShadowLane:
    """A lane of `route` to `target` whose pool is `ep` alone."""
    return ShadowLane(
        route,
        target,
        BackendPool(target, [ep], timeout),
        metrics if metrics is not None else Metrics(),
        timeout=timeout,
        max_in_flight=max_in_flight,
        queue=queue,
    )


def head(method: str, path: str, body_len: int = 0) -> bytes:
    framing = f"content-length: {body_len}\r\n" if body_len else ""
    return f"{method} {path} HTTP/1.1\r\nhost: shadow.test\r\n{framing}\r\n".encode()


class Copy:
    """A ShadowCopy of `method path`, with a future that resolves when it ended."""

    def __init__(self, lane: ShadowLane, path: str, method: str = "GET") -> None:
        self.ended: asyncio.Future[ShadowResult] = asyncio.get_running_loop().create_future()
        self.copy = ShadowCopy(lane, method, head(method, path), EMPTY_BODY, self._done)

    def _done(self, _copy: ShadowCopy, result: ShadowResult) -> None:
        if not self.ended.done():
            self.ended.set_result(result)


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll the loop until `predicate()` holds (the loop keeps running meanwhile)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.005)


def syn_sent_to(port: int) -> int:
    """Connects from this process to 127.0.0.1:`port` still in SYN_SENT (half-open)."""
    mine = socket_inodes(os.getpid())
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == SYN_SENT and fields[2] == f"{LOOPBACK}:{port:04X}" and fields[9] in mine:
            count += 1
    return count
