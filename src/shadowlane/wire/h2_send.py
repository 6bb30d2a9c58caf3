"""The send scheduler both HTTP/2 sides share: streams with something to send go out together.

An HTTP/2 connection (`H2ServerConnection` towards clients, `H2ClientConnection` towards
backends) carries many streams over one socket. Each stream that has something to send (a
head, body bytes, its end) is scheduled here; once per loop iteration, or at the end of the
bytes being read, every scheduled stream is pumped in the order it was scheduled and h2's
output is written in one go: one write and one DATA frame with END_STREAM where the proxy made
three calls. Both sides had the same code for it, and a fix to the batching (when to run,
what `receiving` defers) must hold for both.

Why a dict: it is the ordered set of streams waiting, so a stream scheduled twice before the
run is pumped once, with no flag on the stream. The connection keeps the protocol part: what
`pump` sends for one stream and how `flush` writes.

Compiled (setup.py COMPILED): it runs per stream, on the hot path of both HTTP/2 sides.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["SendScheduler"]

T = TypeVar("T")


def _no_pump(_stream: object) -> None:
    """What a detached scheduler pumps with: nothing."""


def _no_flush() -> None:
    """What a detached scheduler writes with: nothing."""


class SendScheduler(Generic[T]):
    """The streams of one connection waiting to send, and the one loop callback that sends.

    `receiving` is set by the connection while it handles bytes it read: a schedule then only
    queues, and the connection calls `run` itself once the bytes are handled, so what they
    made the streams send leaves in one write.
    """

    __slots__ = ("flush", "loop", "pending", "pump", "receiving", "scheduled")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pump: Callable[[T], None],
        flush: Callable[[], None],
    ) -> None:
        self.loop = loop
        #: sends what one stream has (head, body within the windows, its end)
        self.pump = pump
        #: writes h2's output to the socket
        self.flush = flush
        #: the streams to pump, in the order they were scheduled (an ordered set)
        self.pending: dict[T, None] = {}
        #: a `run` is due from the loop
        self.scheduled = False
        self.receiving = False

    def schedule(self, stream: T) -> None:
        """`stream` has something to send: it goes with the others of this loop iteration."""
        self.pending[stream] = None
        self.kick()

    def kick(self) -> None:
        """Make sure a `run` comes: from the loop, or after the bytes being read."""
        if not self.scheduled and not self.receiving:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def detach(self) -> None:
        """The connection is closed: drop its streams and its bound methods. They held the
        connection in a cycle that only a full collection freed (see wire/parsers.py); a
        `run` already due finds nothing to do."""
        self.pending = {}
        self.pump = _no_pump
        self.flush = _no_flush

    def run(self) -> None:
        """Send what the scheduled streams have, then write h2's output in one go."""
        self.scheduled = False
        pending = self.pending
        if pending:
            self.pending = {}
            pump = self.pump
            for stream in pending:
                pump(stream)
        self.flush()
