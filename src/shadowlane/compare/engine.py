"""The comparison engine: decide each job, count it, and hand sums to the store in batches.

Why a thread and a bounded queue: parsing and diffing answers is CPU work that must never run
on the event loop, and the store may be slow or remote. `Comparator.submit` is a non-blocking
append to a bounded deque that the worker polls (no wake-up per job); when it is full the job
is dropped and counted (`dropped`), so memory stays bounded by `queue_size` jobs plus one batch
whatever the store does. The worker decides
each job (match / noise / diff), counts it in the metrics at once, adds it to a `Batch`, and
writes the batch every `flush_interval` or every `batch` jobs.

The divergence ledger takes the same road: `record_divergence` is a non-blocking append to a
second bounded deque (a full one drops the entry, counted as `ledger_dropped`), and every flush
takes what is there into the batch, so entries reach the store off the event loop, in the same
transaction as the comparison sums, within a `flush_interval`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from shadowlane.compare.diff import Lifted, answer_doc, diff, lift, request_text, values_of
from shadowlane.compare.model import CompareJob
from shadowlane.compare.settings import DEFAULT_SETTINGS, CompareSettings
from shadowlane.store import Batch, Divergence, Example, Store
from shadowlane.store.batch import latency_bucket

if TYPE_CHECKING:
    from shadowlane.config import CompareConfig

log = logging.getLogger("shadowlane.compare")

#: how often the worker deletes examples past the retention, at most
SWEEP_INTERVAL_MAX = 600.0
#: the worker rests (releasing the GIL) once it owes at least this much, not after every job:
#: sleeps shorter than this cost more in wake-ups than they give back
REST_QUANTUM = 0.005
#: how long new jobs may wait before the worker looks (it is not woken per job, see `_jobs`)
POLL_INTERVAL = 0.02
#: batches kept to retry while the store is down: with the default 1 s flush interval, about
#: two minutes of outage (a batch is sums and a few examples: kilobytes, not the answers)
PENDING_BATCHES = 120


class ComparisonCounter(Protocol):
    """What the engine needs of `shadowlane.metrics.Metrics`. Called from the event loop and
    from the worker thread."""

    def comparison(self, route: str, target: str, result: str) -> None: ...

    def ledger_dropped(self, route: str, target: str, n: int = 1) -> None: ...


@dataclass(slots=True)
class Outcome:
    """The decision on one job."""

    #: "match" (no differing path), "noise" (every differing path also differs between primary
    #: and secondary), "diff" (otherwise)
    result: str
    #: paths where the candidate differs from the primary
    differing: list[str]
    #: paths where the secondary differs from the primary (this request's noise)
    noise: list[str]
    primary: Lifted
    candidate: Lifted


def settings_of(job: CompareJob) -> CompareSettings:
    """The shadow's compiled compare settings carried by the job, or the defaults."""
    return job.settings if isinstance(job.settings, CompareSettings) else DEFAULT_SETTINGS


def identical_answers(job: CompareJob, s: CompareSettings) -> bool:
    """Same status, same body bytes, same headers apart from the ignored ones: a match.

    Trailers count like headers: two gRPC answers with equal bodies may differ in grpc-status.
    Most compared answers in a migration are the same, and lifting both (JSON parsing,
    flattening, header paths) is what a comparison costs. Equal bytes lift to equal fields in
    every mode and under every ignore rule, so this is a shortcut, not an approximation. Only
    without a secondary: with one, each job also measures noise, which needs the lifted fields.
    """
    p, c = job.primary, job.candidate
    if p.failure or c.failure or p.truncated or c.truncated:
        return False
    if p.status != c.status or p.body != c.body:
        return False
    ignored = s.ignore_headers
    kept_p = [h for h in p.headers if h[0].decode("latin-1").lower() not in ignored]
    kept_c = [h for h in c.headers if h[0].decode("latin-1").lower() not in ignored]
    if kept_p != kept_c:
        return False
    if p.trailers or c.trailers:  # HTTP/2 answers only (gRPC's status is there)
        kept_p = [h for h in p.trailers if h[0].decode("latin-1").lower() not in ignored]
        kept_c = [h for h in c.trailers if h[0].decode("latin-1").lower() not in ignored]
        return kept_p == kept_c
    return True


def evaluate(job: CompareJob, settings: CompareSettings | None = None) -> Outcome:
    """Lift the answers of one job, diff them, and classify the result. Pure; no I/O."""
    s = settings or settings_of(job)
    primary = lift(job.primary, s, job.uri)
    candidate = lift(job.candidate, s, job.uri)
    differing = diff(primary, candidate, s)
    noise: list[str] = []
    # A failed secondary (or primary) tells nothing about noise: treat it as absent.
    if job.secondary is not None and not job.secondary.failure and not job.primary.failure:
        noise = diff(primary, lift(job.secondary, s, job.uri), s)
    if not differing:
        result = "match"
    elif noise and set(differing) <= set(noise):
        result = "noise"
    else:
        result = "diff"
    return Outcome(result, differing, noise, primary, candidate)


def make_example(job: CompareJob, out: Outcome, ts: float) -> Example:
    """The example pair of one job, as the store keeps it; with redaction rules (the route's
    `record.redact`), removed headers and masked fields never reach it."""
    red = settings_of(job).redact
    values = values_of(out.primary, out.candidate, out.differing)
    uri = job.uri
    request_body = request_text(job.request_body, job.uri, out.primary)
    if red is not None:
        uri = red.target(uri.encode("latin-1")).decode("latin-1")
        request_body = red.json_text(request_body)
        kept: dict[str, list[Any]] = {}
        for path, pair in values.items():
            keep, _ = red.field_value(path, None)
            if keep:
                kept[path] = [red.field_value(path, v)[1] for v in pair]
        values = kept
    return Example(
        route=job.route,
        target=job.target,
        ts=ts,
        request_id=job.request_id,
        method=job.method,
        uri=uri,
        request_body=request_body,
        primary=answer_doc(job.primary, out.primary, red),
        candidate={**answer_doc(job.candidate, out.candidate, red), "values": values},
        differing=out.differing,
        noise=out.noise,
    )


def record(batch: Batch, job: CompareJob, out: Outcome) -> None:
    """Add one decided job to a batch: totals, per-field counts, latency, an example."""
    route, target = job.route, job.target
    batch.add_total(route, target, out.result)
    noise = set(out.noise)
    differing = set(out.differing)
    for path in out.differing:
        batch.add_field(route, target, path, 1, 1 if path in noise else 0)
    for path in out.noise:
        if path not in differing:
            batch.add_field(route, target, path, 0, 1)
    if not job.primary.failure:
        batch.add_latency(route, target, "primary", job.primary.seconds)
    if not job.candidate.failure:
        batch.add_latency(route, target, "shadow", job.candidate.seconds)
    if out.differing:
        ts = job.ts or time.time()
        batch.add_example(route, target, out.differing, ts, lambda: make_example(job, out, ts))


class _MatchTally:
    """Identical answers of one (route, target) since the worker last looked."""

    def __init__(self) -> None:
        self.n = 0
        self.primary: dict[int, int] = {}
        self.shadow: dict[int, int] = {}

    def add(self, primary_seconds: float, shadow_seconds: float) -> None:
        self.n += 1
        b = latency_bucket(primary_seconds)
        self.primary[b] = self.primary.get(b, 0) + 1
        b = latency_bucket(shadow_seconds)
        self.shadow[b] = self.shadow.get(b, 0) + 1


class Comparator:
    """Runs comparisons on a worker thread; `submit` is the only call the event loop makes."""

    def __init__(
        self,
        store: Store,
        metrics: ComparisonCounter | None,
        queue_size: int = 1024,
        *,
        flush_interval: float = 1.0,
        batch: int = 500,
        sweep_interval: float | None = None,
        cpu_share: float = 0.25,
    ) -> None:
        if not 0.0 < cpu_share <= 1.0:
            raise ValueError("cpu_share must be in (0, 1]")
        self.store = store
        self.metrics = metrics
        self.queue_size = queue_size
        self.flush_interval = flush_interval
        self.batch_size = batch
        retention = store.options.retention
        self.sweep_interval = (
            sweep_interval
            if sweep_interval is not None
            else max(1.0, min(SWEEP_INTERVAL_MAX, retention / 10))
        )
        #: At most this share of wall time is spent comparing. The worker holds the GIL while it
        #: lifts and diffs, so without a cap a flood of comparisons would take interpreter time
        #: from the event loop, i.e. from requests. Past the cap the queue fills and jobs drop.
        self.cpu_share = cpu_share
        self._rest_ratio = 1.0 / cpu_share - 1.0
        self._owed = 0.0
        #: Jobs waiting. A deque, not a queue.Queue: `append` and `popleft` are atomic under
        #: the GIL, so a submit takes no lock and wakes no thread. A Queue's put notifies the
        #: waiting worker every time, and at thousands of jobs a second those wake-ups and the
        #: GIL hand-overs they cause cost the event loop more than the comparisons themselves
        #: (futex and context switches were half the proxy's CPU). The worker polls instead.
        self._jobs: deque[CompareJob] = deque()
        #: identical answers decided by `submit`, per (route, target), until the worker takes
        #: them (`_take_matches` swaps the dict under the lock)
        self._matches: dict[tuple[str, str], _MatchTally] = {}
        self._matches_lock = threading.Lock()
        #: divergence ledger entries waiting for the next flush: the same lock-free deque as
        #: `_jobs`, bounded by `queue_size` too
        self._divergences: deque[Divergence] = deque()
        #: accepted by submit (loop thread only) / decided and written (worker only)
        self._accepted = 0
        self._written = 0
        #: the same for ledger entries: recorded / written or given up on (by the worker)
        self._div_accepted = 0
        self._div_written = 0
        #: `stats["ledger_dropped"]` is counted by both threads (a full queue on the loop, a
        #: failed write on the worker): a `+=` on a dict item is not atomic across threads
        self._ledger_stats_lock = threading.Lock()
        self._wake = threading.Event()
        self._written_cond = threading.Condition()
        self._flush_asked = False
        #: batches a store write failed on, oldest first, written before the next one (worker
        #: only); at most `PENDING_BATCHES`, then the oldest is dropped and counted
        self._pending: deque[Batch] = deque()
        self._outage_since: float | None = None
        self._worker: threading.Thread | None = None
        self._stopping = False
        #: counters for status pages and tests
        self.stats = {
            "submitted": 0,
            "dropped": 0,
            "compared": 0,
            "errors": 0,
            "flushes": 0,
            "write_errors": 0,
            #: comparisons decided but never stored: their batch waited past the bound
            "store_lost": 0,
            "swept": 0,
            #: ledger entries taken / not stored (queue full, stopped, or their write failed)
            "ledger_recorded": 0,
            "ledger_dropped": 0,
        }

    @classmethod
    def from_config(
        cls, store: Store, metrics: ComparisonCounter | None, cfg: CompareConfig
    ) -> Comparator:
        """A comparator with the queue and batching of the `compare:` config block."""
        return cls(
            store,
            metrics,
            cfg.queue,
            flush_interval=cfg.flush_interval,
            batch=cfg.batch,
            cpu_share=cfg.cpu_share,
        )

    # -- event loop side -----------------------------------------------------------------------

    def submit(self, job: CompareJob) -> bool:
        """Queue a job without blocking; False (and `dropped` counted) when full or stopped.

        Byte-identical answers (`identical_answers`, the common case) are decided here, on the
        loop: comparing two equal byte strings costs less than handing the job to the worker,
        which wakes it and makes the two threads trade the GIL. They are tallied (count and both
        latencies) and the worker takes the tally into its next batch, so they are stored and
        reported like every other comparison.
        """
        if self._stopping:
            return self._drop(job)
        if job.secondary is None and identical_answers(job, settings_of(job)):
            key = (job.route, job.target)
            with self._matches_lock:  # uncontended but for the worker's swap: no syscall
                tally = self._matches.get(key)
                if tally is None:
                    tally = self._matches[key] = _MatchTally()
                tally.add(job.primary.seconds, job.candidate.seconds)
            self._accepted += 1
            self.stats["submitted"] += 1
            if self.metrics is not None:
                self.metrics.comparison(job.route, job.target, "match")
            return True
        if len(self._jobs) >= self.queue_size:
            return self._drop(job)
        self._accepted += 1
        self.stats["submitted"] += 1
        self._jobs.append(job)
        return True

    def _drop(self, job: CompareJob) -> bool:
        self.stats["dropped"] += 1
        if self.metrics is not None:
            self.metrics.comparison(job.route, job.target, "dropped")
        return False

    def record_divergence(self, d: Divergence) -> bool:
        """Queue a ledger entry for the next flush without blocking; False (and
        `ledger_dropped` counted) when the queue holds `queue_size` entries or the comparator
        stopped. Counting the divergence itself (`Metrics.divergence`) is the caller's: it
        knows what happened, this only keeps the record."""
        if self._stopping or len(self._divergences) >= self.queue_size:
            with self._ledger_stats_lock:
                self.stats["ledger_dropped"] += 1
            if self.metrics is not None:
                self.metrics.ledger_dropped(d.route, d.target)
            return False
        self._div_accepted += 1
        self.stats["ledger_recorded"] += 1
        self._divergences.append(d)
        return True

    @property
    def queued(self) -> int:
        """Jobs waiting to be compared (for a gauge)."""
        return len(self._jobs)

    @property
    def ledger_queued(self) -> int:
        """Ledger entries waiting for the next flush (for a gauge)."""
        return len(self._divergences)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> Comparator:
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._run, name="shadowlane-comparator", daemon=True
            )
            self._worker.start()
        return self

    @property
    def pending_batches(self) -> int:
        """Batches waiting for the store to take them (it failed the last write)."""
        return len(self._pending)

    def stop(self, timeout: float = 10.0) -> bool:
        """Compare what is queued, flush, and join; False if the worker did not end in time."""
        self._stopping = True
        thread = self._worker
        if thread is None:
            return True
        self._wake.set()
        thread.join(timeout)
        return not thread.is_alive()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every accepted job is compared and written, and every recorded ledger
        entry written (tests, `report` after a run)."""
        target = self._accepted
        div_target = self._div_accepted
        if self._worker is None:
            return self._written >= target and self._div_written >= div_target
        deadline = time.monotonic() + timeout
        with self._written_cond:
            while self._written < target or self._div_written < div_target:
                self._flush_asked = True
                self._wake.set()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._written_cond.wait(min(remaining, POLL_INTERVAL))
        return True

    # -- worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        batch = self._new_batch()
        next_flush = time.monotonic() + self.flush_interval
        next_sweep = time.monotonic()
        jobs = self._jobs
        while True:
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep()
                next_sweep = now + self.sweep_interval
            while jobs:
                job = jobs.popleft()
                started = time.perf_counter()
                self._decide(batch, job)
                self._owed += (time.perf_counter() - started) * self._rest_ratio
                if batch.jobs >= self.batch_size:
                    self._flush(batch)
                    batch = self._new_batch()
                    next_flush = time.monotonic() + self.flush_interval
                # no resting once stop() was called: finishing the backlog quickly is what a
                # draining process needs, and the event loop is winding down anyway
                if self._owed >= REST_QUANTUM and not self._stopping:
                    time.sleep(self._owed)
                    self._owed = 0.0
            stopping = self._stopping
            if (
                self._flush_asked
                or stopping
                or time.monotonic() >= next_flush
                or len(self._divergences) >= self.batch_size
            ):
                self._flush_asked = False
                self._flush(batch)
                batch = self._new_batch()
                next_flush = time.monotonic() + self.flush_interval
            if stopping and not jobs:
                while self._pending:
                    self._lose(self._pending.popleft(), "the store was down at shutdown")
                return
            waited = time.monotonic()
            self._wake.wait(min(POLL_INTERVAL, max(0.0, next_flush - time.monotonic())))
            self._wake.clear()
            # time spent waiting for work is rest already owed to the event loop
            self._owed = max(0.0, self._owed - (time.monotonic() - waited))

    def _new_batch(self) -> Batch:
        return Batch(examples_per_field=self.store.options.examples_per_field)

    def _take_matches(self, batch: Batch) -> None:
        with self._matches_lock:
            matches, self._matches = self._matches, {}
        for (route, target), tally in matches.items():
            batch.add_matches(route, target, tally.n)
            batch.jobs += tally.n
            self.stats["compared"] += tally.n
            for side, counts in (("primary", tally.primary), ("shadow", tally.shadow)):
                for bucket, n in counts.items():
                    batch.add_latency_count(route, target, side, bucket, n)

    def _decide(self, batch: Batch, job: CompareJob) -> None:
        batch.jobs += 1  # owed a task_done at the next flush, whatever happens below
        try:
            out = evaluate(job)
            record(batch, job, out)
        except Exception:
            self.stats["errors"] += 1
            log.exception("comparison of %s %s failed", job.method, job.uri)
            return
        self.stats["compared"] += 1
        if self.metrics is not None:
            self.metrics.comparison(job.route, job.target, out.result)

    def _take_divergences(self, batch: Batch) -> None:
        entries = self._divergences
        # popleft until empty: the loop may append meanwhile, and those wait for the next flush
        while entries:
            batch.divergences.append(entries.popleft())

    def _flush(self, batch: Batch) -> None:
        # every write includes the identical answers decided on the loop since the last one
        # and the ledger entries recorded since (after stop() no more can come, so the last
        # flush has them all)
        self._take_matches(batch)
        self._take_divergences(batch)
        try:
            if batch:
                self._pending.append(batch)
            self._write_pending()
        finally:
            with self._written_cond:
                self._written += batch.jobs
                self._div_written += len(batch.divergences)
                self._written_cond.notify_all()

    def _write_pending(self) -> None:
        """Write the waiting batches, oldest first, until one fails.

        The store is down (PostgreSQL restarting) or refused a batch: the batch waits and is
        tried again at the next flush, so an outage of up to PENDING_BATCHES flushes costs
        nothing once the store is back (the store catches up). Past the bound the oldest is
        dropped, its comparisons counted in `store_lost` and its ledger entries as
        `ledger_dropped`: memory stays bounded by the bound, and a batch the store refuses
        for good blocks the others for that long at most.
        """
        pending = self._pending
        while pending:
            try:
                self.store.write(pending[0])
            except Exception as exc:
                self.stats["write_errors"] += 1
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning(
                        "comparison store write failed (keeping up to %d batches to retry): %s",
                        PENDING_BATCHES,
                        exc,
                    )
                break
            pending.popleft()
            self.stats["flushes"] += 1
            if self._outage_since is not None and not pending:
                log.warning(
                    "comparison store writable again after %.1fs; caught up",
                    time.monotonic() - self._outage_since,
                )
                self._outage_since = None
        while len(pending) > PENDING_BATCHES:
            self._lose(pending.popleft(), "waited past the retry bound")

    def _lose(self, batch: Batch, why: str) -> None:
        self.stats["store_lost"] += batch.jobs
        log.warning(
            "comparison store: %d results and %d ledger entries lost (%s)",
            batch.jobs,
            len(batch.divergences),
            why,
        )
        self._lost_divergences(batch.divergences)

    def _lost_divergences(self, entries: list[Divergence]) -> None:
        with self._ledger_stats_lock:
            self.stats["ledger_dropped"] += len(entries)
        if self.metrics is None:
            return
        per_pair: dict[tuple[str, str], int] = {}
        for d in entries:
            per_pair[(d.route, d.target)] = per_pair.get((d.route, d.target), 0) + 1
        for (route, target), n in per_pair.items():
            self.metrics.ledger_dropped(route, target, n)

    def _sweep(self) -> None:
        try:
            self.stats["swept"] += self.store.sweep()
        except Exception as exc:
            log.warning("comparison store retention sweep failed: %s", exc)
