"""Handing freed heap memory back to the system, so resident memory follows what is in use.

Why: glibc's malloc keeps the pages of chunks it frees. A burst of big uploads (each body is a
few 256 KiB chunks, one per read) lifts the heap to its high-water mark, and after the burst
the process stays there: measured with 50 clients posting 1 MiB bodies, 138 MB resident while
the bodies in flight needed under 100 MB at their peak and about 75 MB most of the time. The
overload manager's `rss` watermarks read that figure: a burst that crossed `refuse` would have
had every later request answered 503 although nothing was in use any more. Envoy answers the
same problem with tcmalloc's background release and its `shrink_heap` overload action; Ruby
calls `malloc_trim` after a major collection. Here a timer looks at the allocator every
`interval` and, when at least `min_free` of freed memory stayed resident since the last
release, calls `malloc_trim(0)`, which gives every whole free page back (`MADV_DONTNEED`).

How much stays resident unused is estimated from `mallinfo2`: what the process has resident
beyond the bytes malloc has handed out (`uordblks` + `hblkhd`), measured against the lowest it
was since the last release, so libraries, thread stacks and Python's own arenas do not count.

The trim runs on a thread of its own: ctypes lets go of the GIL for the call, so the loop goes
on running Python; it waits only if it needs malloc's arena lock while the trim holds it. A
trim that finds nothing to release costs a walk of the free lists. Only glibc has these calls:
elsewhere (musl, macOS) the release is off and says so in `available`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

from shadowlane.wire.overload import read_rss

__all__ = ["HeapRelease", "HeapStats"]


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33 and later): every field a size_t."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc() -> tuple[Callable[[int], int], Callable[[], _MallInfo2]] | None:
    """`malloc_trim` and `mallinfo2` of the running C library, or None without them."""
    try:
        libc = ctypes.CDLL(None)
        trim: Any = libc.malloc_trim
        info: Any = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    info.argtypes = []
    info.restype = _MallInfo2
    return trim, info


_LIBC = _glibc()


class HeapStats:
    """What the releases did since the process started (for /metrics)."""

    __slots__ = ("released_bytes", "releases", "seconds")

    def __init__(self) -> None:
        self.releases = 0
        #: resident memory given back, as /proc/self/statm saw it before and after each trim
        self.released_bytes = 0
        #: time the trims took, on their thread
        self.seconds = 0.0


class HeapRelease:
    """The timer that looks at the allocator and starts a trim when one is worth it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, min_free: int) -> None:
        self.loop = loop
        self.interval = interval
        self.min_free = min_free
        self.stats = HeapStats()
        #: glibc's calls were found: without them nothing runs
        self.available = _LIBC is not None
        #: resident-but-not-allocated bytes at their lowest since the last trim
        self._floor = -1
        self._timer: asyncio.TimerHandle | None = None
        self._trimming = False
        self._stopped = True

    def configure(self, interval: float, min_free: int) -> None:
        """A reload's values, in place: the next tick uses them (0 stops the timer)."""
        self.interval = interval
        self.min_free = min_free
        if not self._stopped and self._timer is None and interval > 0:
            self._schedule()

    def start(self) -> None:
        self._stopped = False
        if self.available and self.interval > 0:
            self._schedule()

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        self._timer = self.loop.call_later(self.interval, self._tick)

    def allocated(self) -> int:
        """Bytes malloc has handed out and not had back (0 without glibc's calls)."""
        if _LIBC is None:
            return 0
        info = _LIBC[1]()
        return int(info.uordblks + info.hblkhd)

    def unused_resident(self) -> int:
        """Resident bytes beyond what malloc has handed out (libraries, stacks and Python's
        arenas included: only its growth says anything)."""
        if _LIBC is None:
            return 0
        return max(0, read_rss() - self.allocated())

    def _tick(self) -> None:
        self._timer = None
        if self._stopped or self.interval <= 0:
            return
        self._schedule()
        if self._trimming:
            return
        unused = self.unused_resident()
        if self._floor < 0 or unused < self._floor:
            self._floor = unused
        if unused - self._floor < self.min_free:
            return
        self._trimming = True
        threading.Thread(target=self._trim, name="shadowlane-heap-release", daemon=True).start()

    def _trim(self) -> None:
        """On its own thread: the trim, and what it gave back."""
        assert _LIBC is not None
        released, seconds, floor = 0, 0.0, -1
        try:
            before = read_rss()
            t0 = time.perf_counter()
            _LIBC[0](0)
            seconds = time.perf_counter() - t0
            released = max(0, before - read_rss())
            floor = self.unused_resident()
        finally:  # whatever happened, the loop hears of it, or no trim would ever run again
            # the loop may have closed while the trim ran: then nobody is left to count it
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._trimmed, released, seconds, floor)

    def _trimmed(self, released: int, seconds: float, floor: int) -> None:
        stats = self.stats
        stats.releases += 1
        stats.released_bytes += released
        stats.seconds += seconds
        self._floor = floor
        self._trimming = False
