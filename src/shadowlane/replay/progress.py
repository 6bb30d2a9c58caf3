"""The progress bar: one line on stderr, redrawn in place, only when stderr is a terminal.

    [##########----------] 1200/2400  50%  398.2/s  errors 0  ETA 00:03

`done` counts requests sent to the target; `total` is the number of requests the recording
selects (counted in the background at the start; `?` until known, and with `--loop` the
`--max-requests` bound if there is one). The rate is over the last few seconds, the ETA is the
rest at that rate. The last state is left on the terminal when the replay ends. Nothing is
written when stderr is not a terminal (a script's log, CI).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TextIO

from shadowlane.replay.summary import Tally, eta

INTERVAL = 0.25
WIDTH = 20


class Progress:
    def __init__(self, stream: TextIO, tally: Tally) -> None:
        self.stream = stream
        self.tally = tally
        self._samples: deque[tuple[float, int]] = deque(maxlen=20)
        self._drawn = 0

    def line(self, now: float) -> str:
        t = self.tally
        done = t.done
        self._samples.append((now, done))
        then, before = self._samples[0]
        rate = (done - before) / (now - then) if now > then else 0.0
        total = t.total
        if total:
            filled = min(WIDTH, int(WIDTH * done / total))
            bar = "#" * filled + "-" * (WIDTH - filled)
            pct = f"{100 * done / total:3.0f}%"
            remaining = (total - done) / rate if rate > 0 else None
            count = f"{done}/{total}"
        else:
            bar = "-" * WIDTH
            pct = "   ?"
            remaining = None
            count = f"{done}/?"
        return (
            f"[{bar}] {count} {pct}  {rate:.1f}/s  errors {t.to.errors + t.to.timeouts}"
            f"  ETA {eta(t, remaining)}"
        )

    def draw(self) -> None:
        text = self.line(time.monotonic())
        pad = " " * max(0, self._drawn - len(text))
        self.stream.write("\r" + text + pad)
        self.stream.flush()
        self._drawn = len(text)

    def finish(self) -> None:
        """The last state stays on the terminal, its line ended (the summary follows)."""
        self.draw()
        self.stream.write("\n")
        self.stream.flush()
        self._drawn = 0

    async def run(self) -> None:
        try:
            while True:
                self.draw()
                await asyncio.sleep(INTERVAL)
        finally:
            self.finish()
