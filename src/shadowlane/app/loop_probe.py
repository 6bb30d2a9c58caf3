"""The loop-lag probe: a task that sleeps a short interval and measures how late it woke.

Why: "the event loop never stalls" is the promise every other part leans on (a comparison, a
store write or a big body must never make a request wait), and the only honest way to check it
is from inside the loop. A task that asks to wake after `interval` and wakes `lag` later saw
the loop busy (or the process descheduled) for `lag`; a request that became ready at the same
moment waited as long. Each wake-up is one observation in `shadowlane_loop_lag_seconds`.

Cost: one timer and one histogram observation per interval (at the default 100 ms, ten a
second); a test or an investigation sets `admin.loop_lag_probe: 1ms` for a fine picture.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def probe_loop_lag(interval: float, observe: Callable[[float], None]) -> None:
    """Observe the loop's wake-up delay every `interval` seconds, until cancelled."""
    clock = time.perf_counter
    sleep = asyncio.sleep
    while True:
        asked = clock()
        await sleep(interval)
        observe(max(0.0, clock() - asked - interval))
