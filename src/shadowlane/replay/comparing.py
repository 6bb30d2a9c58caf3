"""Comparing replayed answers (the engine's `evaluate` and `record`) and keeping the ledger's
entries, on one thread, batched into the store.

Why not the proxy's `Comparator`: it is built for a server, where a comparison must never cost
a request, so it drops jobs when its queue is full and rests to stay under a CPU share; and it
tells nobody how each job came out. A replay is the other way round: the comparison is what it
is run for, its exit status depends on every job's result, and nobody waits for its requests.
So here each job is decided on one worker thread (`evaluate`, the same function the comparator
runs), its result comes back to the replay, and `record` adds it to a `Batch` written to the
store every `BATCH` jobs or `FLUSH_INTERVAL` seconds, as the comparator does. There is no
queue to overflow: a request holds its slot of `--concurrency` until its comparison is decided,
so when comparing is the bottleneck the replay slows down instead of dropping results.

The rows are the comparator's (same tables, same sums, same examples), so `shadowlane report`
and the dashboard read a replay's comparisons like live ones. Divergence ledger entries of the
write steps ride in the same batches (`Batch.divergences`), as the comparator's do, so
`report`, `GET /api/ledger` and `verify --suspects` see a replay's suspects like live ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from shadowlane.compare import CompareJob, CompareSettings, evaluate, record
from shadowlane.store import Batch, Store
from shadowlane.store.ledger import Divergence

log = logging.getLogger("shadowlane.replay")

BATCH = 500
FLUSH_INTERVAL = 1.0


class Decided:
    """One job's result, for the replay's summary."""

    __slots__ = ("differing", "noise", "result")

    def __init__(self, result: str, differing: list[str], noise: list[str]) -> None:
        #: match, noise or diff
        self.result = result
        self.differing = differing
        self.noise = noise


class Comparisons:
    """Decides jobs on a worker thread and writes their sums to the store (if any)."""

    def __init__(self, store: Store | None) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shadowlane-replay-compare")
        self._batch = self._new_batch()
        self._last_flush = time.monotonic()
        self.write_errors = 0
        self.written = 0

    def _new_batch(self) -> Batch:
        per_field = self.store.options.examples_per_field if self.store is not None else 0
        return Batch(examples_per_field=per_field)

    async def decide(self, job: CompareJob, settings: CompareSettings) -> Decided:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._decide, job, settings)

    def _decide(self, job: CompareJob, settings: CompareSettings) -> Decided:
        """On the worker thread: every touch of the batch is here or in `_flush`."""
        out = evaluate(job, settings)
        if self.store is not None:
            record(self._batch, job, out)
            self._batch.jobs += 1
            if self._batch.jobs >= BATCH or time.monotonic() - self._last_flush >= FLUSH_INTERVAL:
                self._flush()
        return Decided(out.result, out.differing, out.noise)

    def record_divergence(self, d: Divergence) -> bool:
        """Keep a ledger entry for the store (never blocks: it is written on the worker)."""
        if self.store is None:
            return False
        self._pool.submit(self._divergence, d)
        return True

    def _divergence(self, d: Divergence) -> None:
        batch = self._batch
        batch.divergences.append(d)
        if len(batch.divergences) >= BATCH or time.monotonic() - self._last_flush >= FLUSH_INTERVAL:
            self._flush()

    def _flush(self) -> None:
        batch, self._batch = self._batch, self._new_batch()
        self._last_flush = time.monotonic()
        if self.store is None or not batch:
            return
        try:
            self.store.write(batch)
            self.written += batch.jobs
        except Exception as exc:  # a store that fails loses these sums, logged and counted
            self.write_errors += 1
            log.warning(
                "comparison store write failed, %d results and %d ledger entries lost: %s",
                batch.jobs,
                len(batch.divergences),
                exc,
            )

    async def close(self) -> None:
        """Write what is left and stop the thread."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._flush)
        self._pool.shutdown(wait=True)
