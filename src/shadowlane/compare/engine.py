"""The comparison engine: decide each job, count it, and hand sums to the store in batches.

Why child processes, a thread and a bounded queue: parsing and diffing answers is CPU work that
must never run on the event loop, nor hold the GIL the loop needs (a ~1 MiB JSON answer holds
it for tens of milliseconds), and the store may be slow or remote. `Comparator.submit` is a
non-blocking append to a bounded deque (no wake-up per job); when it is full the job is dropped
and counted (`dropped`), so memory stays bounded by `queue_size` jobs plus one batch in flight
per child (at most `BATCH_JOBS` jobs, and `BATCH_BYTES` of bodies past its first job) plus one
store batch, whatever the store does. With `processes` >= 1 (the default: 1), one feeder
per comparison child takes the jobs queued, sends them to its child in one batch
(compare/pool.py: the bodies are written raw, once) and waits for their `Decision`s; the child
parses, diffs and builds the examples (compare/worker.py). In the proxy the feeders run on the
event loop itself over non-blocking pipes (`_LoopFeeder`, see there why); a comparator started
without a loop (tests, tools) has a feeder thread per child instead. A child that
dies is started again and the jobs it held are counted as dropped. With `processes: 0` the
feeder decides jobs itself, in this process (the pre-0.x behaviour, for tests and for machines
that cannot fork). Each decision is counted in the metrics at once; the collector thread adds
it to a `Batch` and writes the batch every `flush_interval` or every `batch` jobs.

The divergence ledger takes the same road: `record_divergence` is a non-blocking append to a
second bounded deque (a full one drops the entry, counted as `ledger_dropped`), and every flush
takes what is there into the batch, so entries reach the store off the event loop, in the same
transaction as the comparison sums, within a `flush_interval`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from shadowlane.compare.diff import (
    EXAMPLE_VALUES,
    Lifted,
    answer_doc,
    diff,
    lift,
    request_text,
    values_of,
)
from shadowlane.compare.model import CompareJob, Decision, Headers
from shadowlane.compare.pool import (
    MAX_RESULT,
    RESULT,
    ChildDied,
    ChildProcess,
    decision_of,
    write_some,
)
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
#: a feeder hands a child at most this many queued jobs at once, and stops adding jobs once
#: their bodies hold `BATCH_BYTES` (so what is in flight per child stays bounded)
BATCH_JOBS = 16
BATCH_BYTES = 1024**2
#: a child that cannot be started is tried again after this long (its jobs meanwhile drop)
RESTART_BACKOFF = 1.0
#: settings objects remembered by token; past this many (many reloads) the table starts over
SETTINGS_TOKENS_MAX = 4096
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


def _body_bytes(job: CompareJob) -> int:
    n = len(job.primary.body) + len(job.candidate.body)
    return n if job.secondary is None else n + len(job.secondary.body)


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
    # Names travel lower-cased (wire/headers.py), so they are tested as bytes. A name that is
    # not (an answer built elsewhere) only makes the lists differ: the job then goes to a
    # child, which lower-cases as it lifts, so this stays a shortcut and never a wrong match.
    if p.headers != c.headers and _kept(p.headers, s) != _kept(c.headers, s):
        return False
    if p.trailers != c.trailers:  # HTTP/2 answers only (gRPC's status is there)
        return _kept(p.trailers, s) == _kept(c.trailers, s)
    return True


def _kept(headers: Headers, s: CompareSettings) -> Headers:
    """The headers that are compared: those whose name is not ignored."""
    ignored = s.ignore_header_names
    return [h for h in headers if h[0] not in ignored]


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


def example_paths(differing: list[str]) -> list[str]:
    """The fields an example pair is kept for: the first `EXAMPLE_VALUES` differing ones, the
    same whose two values the example shows. An answer that differs in thousands of leaves
    (a changed array of records) would otherwise make every flush link and trim thousands of
    example rows, which took seconds of the store's time per flush and, on the collector
    thread, the GIL from the event loop; the fields past the cap are still counted."""
    return differing[:EXAMPLE_VALUES]


def _count(
    batch: Batch,
    route: str,
    target: str,
    result: str,
    differing: list[str],
    noise: list[str],
    primary_failure: str,
    primary_seconds: float,
    candidate_failure: str,
    candidate_seconds: float,
) -> None:
    """The sums of one decided comparison: its total, per-field counts (a field both differing
    and noise counts once, as noise too) and the latencies of the answers that came. One
    place, so a decision made here (`record`) and one made in a child (`record_decision`)
    are counted alike."""
    batch.add_total(route, target, result)
    noise_set = set(noise)
    differing_set = set(differing)
    for path in differing:
        batch.add_field(route, target, path, 1, 1 if path in noise_set else 0)
    for path in noise:
        if path not in differing_set:
            batch.add_field(route, target, path, 0, 1)
    if not primary_failure:
        batch.add_latency(route, target, "primary", primary_seconds)
    if not candidate_failure:
        batch.add_latency(route, target, "shadow", candidate_seconds)


def record(batch: Batch, job: CompareJob, out: Outcome) -> None:
    """Add one decided job to a batch: totals, per-field counts, latency, an example."""
    route, target = job.route, job.target
    p, c = job.primary, job.candidate
    _count(
        batch, route, target, out.result, out.differing, out.noise,
        p.failure, p.seconds, c.failure, c.seconds,
    )  # fmt: skip
    if out.differing:
        ts = job.ts or time.time()
        batch.add_example(
            route, target, example_paths(out.differing), ts, lambda: make_example(job, out, ts)
        )


def decide(
    job: CompareJob, wants_example: Callable[[CompareJob, list[str]], bool] | None = None
) -> Decision:
    """Everything a comparison costs, in one call: lift, diff, classify, and the example pair
    when anything differs and `wants_example(job, fields)` says one for those fields may still
    be kept (the comparison child's quota, compare/worker.py). Run by the comparison child (or
    the feeder with `processes: 0`)."""
    out = evaluate(job)
    example: dict[str, object] | None = None
    if out.differing and (
        wants_example is None or wants_example(job, example_paths(out.differing))
    ):
        ts = job.ts or time.time()
        ex = make_example(job, out, ts)
        example = {name: getattr(ex, name) for name in _EXAMPLE_FIELDS}
    return Decision(out.result, out.differing, out.noise, example)


_EXAMPLE_FIELDS = (
    "route",
    "target",
    "ts",
    "request_id",
    "method",
    "uri",
    "request_body",
    "primary",
    "candidate",
    "differing",
    "noise",
)


class Pending:
    """What the proxy's process keeps of a job handed to a child: enough to count and store
    its decision, or to count it as dropped if the child dies (the bodies are not kept).
    A plain class, not a dataclass: mypyc compiles this `__init__`, and keeps the one a
    dataclass generates interpreted (one per compared job, on the feeder, with the GIL)."""

    __slots__ = (
        "candidate_failure",
        "candidate_seconds",
        "primary_failure",
        "primary_seconds",
        "route",
        "target",
        "ts",
    )

    def __init__(
        self,
        route: str,
        target: str,
        primary_failure: str,
        primary_seconds: float,
        candidate_failure: str,
        candidate_seconds: float,
        ts: float,
    ) -> None:
        self.route = route
        self.target = target
        self.primary_failure = primary_failure
        self.primary_seconds = primary_seconds
        self.candidate_failure = candidate_failure
        self.candidate_seconds = candidate_seconds
        self.ts = ts

    @classmethod
    def of(cls, job: CompareJob) -> Pending:
        p, c = job.primary, job.candidate
        return cls(job.route, job.target, p.failure, p.seconds, c.failure, c.seconds, job.ts)


def record_decision(batch: Batch, job: Pending, d: Decision) -> None:
    """`record` for a decision made elsewhere: the same sums, and the example as built."""
    route, target = job.route, job.target
    _count(
        batch, route, target, d.result, d.differing, d.noise,
        job.primary_failure, job.primary_seconds, job.candidate_failure, job.candidate_seconds,
    )  # fmt: skip
    fields = d.example
    if d.differing and fields is not None:
        ts = job.ts or float(fields.get("ts") or time.time())  # type: ignore[arg-type]
        batch.add_example(
            route,
            target,
            example_paths(d.differing),
            ts,
            lambda: Example(**fields),  # type: ignore[arg-type]
        )


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


class _LoopFeeder:
    """Feeds one comparison child from the event loop's own thread, over non-blocking pipes.

    Why not a feeder thread (what `processes` >= 1 ran before, and still runs for a
    comparator started without a loop): every blocking call of that thread (the `writev`,
    the read of the answers, its rests) gave up the GIL and then took it back from the event
    loop, which had to stop at its next switch interval and hand it over. Measured under
    compare-json-diff (every answer differs, the queue full), that cost the loop about 70 us of
    CPU per comparison, mostly the kernel's wake-ups, for work that costs the loop itself a
    few microseconds per job: framing it (a small pickle; the bodies are written as they
    are) and reading its decision back (a tuple). Here no other thread runs Python for a
    comparison but the collector, once per flush.

    The cycle: `kick` (a job was queued) schedules `_send`, which takes a batch of what is
    queued (`Comparator._batch`) and writes it, the rest of it when the pipe has room
    (`add_writer`); `_readable` gathers the answers and, once the batch is answered, settles
    it and either sends the next batch or rests for `cpu_share` (`call_later`). The pipe from
    the child is always watched, so a child that dies, even idle, is seen at once (EOF): one
    that held a batch costs it (counted `dropped`), and it is started again (after
    `RESTART_BACKOFF` if it died as soon as it started).
    """

    def __init__(
        self, comp: Comparator, child: ChildProcess, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.comp = comp
        self.child = child
        self.loop = loop
        #: the loop's thread (the feeder is built on it): `kick` from elsewhere goes through
        #: `call_soon_threadsafe`
        self.thread = threading.get_ident()
        #: the child's (stdin, stdout), non-blocking, while it runs
        self.fds: tuple[int, int] | None = None
        self.writing = False
        #: the batch with the child, and the decisions it has sent back so far
        self.pendings: list[Pending] = []
        self.results: list[Decision] = []
        #: what is left to write of the batch
        self.out: list[memoryview] = []
        self.inbuf = bytearray()
        #: resting (cpu_share) or backing off after a quick death
        self.timer: asyncio.TimerHandle | None = None
        self.scheduled = False
        #: rest owed, and since when the feeder has waited for work (which counts as rest)
        self.owed = 0.0
        self.idle_since = time.monotonic()
        self.last_death = -RESTART_BACKOFF
        #: set once it has nothing left to do after `stop` (the collector waits for it)
        self.finished = threading.Event()

    # -- any thread ----------------------------------------------------------------------------

    def kick(self) -> None:
        """A job was queued: send a batch unless one is out, a send is scheduled already, or
        the feeder rests."""
        if self.pendings or self.scheduled or self.timer is not None:
            return
        if threading.get_ident() == self.thread:
            self.scheduled = True
            self.loop.call_soon(self._send)
        else:
            self._threadsafe(self._wake)

    def stopping(self) -> None:
        """`Comparator.stop` began: no more resting, finish the backlog."""
        self._threadsafe(self._wake)

    def abandon(self) -> None:
        """`Comparator.stop` ran out of time: drop what is in flight and queued."""
        self._threadsafe(self._abandon)

    def _threadsafe(self, fn: Callable[[], None]) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed: nothing runs it any more
            self.child.kill()
            self.finished.set()

    # -- the loop's thread ---------------------------------------------------------------------

    def open(self) -> None:
        """Start the child if it is not running, and watch its pipes."""
        if self.fds is not None:
            return
        child = self.child
        if child.proc is None:
            child.start()
        self.fds = child.pipes()
        self.loop.add_reader(self.fds[1], self._readable)

    def _wake(self) -> None:
        if self.timer is not None and self.comp._stopping:
            self.timer.cancel()
            self.timer = None
        if not self.scheduled and not self.pendings and self.timer is None:
            self.scheduled = True
            self.loop.call_soon(self._send)

    def _send(self) -> None:
        self.scheduled = False
        if self.pendings or self.timer is not None or self.finished.is_set():
            return
        comp = self.comp
        jobs = comp._jobs
        if comp._abandon:
            while jobs:
                job = jobs.popleft()
                comp._took(_body_bytes(job))
                comp._settle(Pending.of(job), None)
            self._finish()
            return
        if not jobs:
            if comp._stopping:
                self._finish()
            else:
                self.idle_since = time.monotonic()
            return
        now = time.monotonic()
        self.owed = max(0.0, self.owed - (now - self.idle_since))
        self.idle_since = now
        batch = comp._batch(jobs.popleft())
        self.pendings = [Pending.of(j) for j in batch]
        try:
            self.open()
            buffers = self.child.batch_frames(batch, [comp._token(j) for j in batch])
        except ChildDied as exc:
            del batch
            self._died(str(exc))
            return
        del batch  # the frames hold the bodies until they are written
        self.out = [memoryview(b) for b in buffers if b]
        self._write()

    def _write(self) -> None:
        fds = self.fds
        if fds is None:
            return
        try:
            done = write_some(fds[0], self.out)
        except OSError as exc:
            self._died(f"comparison child {self.child.pid} died: {exc}")
            return
        if not done:
            if not self.writing:
                self.writing = True
                self.loop.add_writer(fds[0], self._write)
            return
        if self.writing:
            self.writing = False
            self.loop.remove_writer(fds[0])

    def _readable(self) -> None:
        fds = self.fds
        if fds is None:
            return
        try:
            data = os.read(fds[1], 1 << 16)
        except BlockingIOError:
            return
        except OSError as exc:
            self._died(f"comparison child {self.child.pid} died: {exc}")
            return
        if not data:
            self._died(f"comparison child {self.child.pid} died: its pipe closed")
            return
        buf = self.inbuf
        buf += data
        head = RESULT.size
        while len(buf) >= head:
            (length,) = RESULT.unpack_from(buf)
            if length > MAX_RESULT:
                self._died(f"comparison child {self.child.pid} sent a {length}-byte result")
                return
            if len(buf) < head + length:
                break
            payload = bytes(buf[head : head + length])
            del buf[: head + length]
            if len(self.results) >= len(self.pendings):
                self._died(f"comparison child {self.child.pid} answered a job it did not have")
                return
            try:
                self.results.append(decision_of(payload))
            except (EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
                self._died(f"comparison child {self.child.pid} sent garbage: {exc}")
                return
        if self.pendings and len(self.results) == len(self.pendings):
            self._answered()

    def _answered(self) -> None:
        comp = self.comp
        pendings, results = self.pendings, self.results
        self.pendings, self.results = [], []
        spent = 0.0
        for pending, decision in zip(pendings, results, strict=True):
            comp._settle(pending, decision)
            spent += decision.cpu
        self.owed += spent * comp._rest_ratio
        self.idle_since = time.monotonic()
        if self.owed >= REST_QUANTUM and not comp._stopping:
            self.timer = self.loop.call_later(self.owed, self._rested)
            self.owed = 0.0
        else:
            self._send()

    def _rested(self) -> None:
        self.timer = None
        self.idle_since = time.monotonic()  # the rest is not also time waited for work
        self._send()

    def _unwatch(self) -> None:
        fds = self.fds
        if fds is not None:
            self.loop.remove_reader(fds[1])
            if self.writing:
                self.loop.remove_writer(fds[0])
        self.fds = None
        self.writing = False
        self.out = []
        self.inbuf = bytearray()

    def _died(self, why: str) -> None:
        """The child is gone (or broke the protocol): count what it held, start another."""
        comp = self.comp
        self._unwatch()
        self.child.kill()
        lost, self.pendings, self.results = self.pendings, [], []
        for pending in lost:
            comp._settle(pending, None)
        now = time.monotonic()
        quick = now - self.last_death < RESTART_BACKOFF
        self.last_death = now
        if comp._abandon or (comp._stopping and not comp._jobs):
            self._send()  # drops what is queued, or finishes
            return
        if lost:
            log.warning("%s; its comparisons are dropped, starting another", why)
            comp._count("restarts")
        if quick or self.timer is not None:
            if self.timer is None:  # dying at once: slow down
                self.timer = self.loop.call_later(RESTART_BACKOFF, self._rested)
            return
        try:
            self.open()  # now, so the next comparison does not wait for it
        except ChildDied as exc:
            log.warning("%s; it is tried again at the next comparison", exc)
        self._send()

    def _abandon(self) -> None:
        if self.pendings:
            self._died("abandoned at shutdown")
        else:
            self._send()

    def _finish(self) -> None:
        self._unwatch()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.child.close(1.0)  # it exits at EOF, at once: it holds no job
        self.finished.set()
        self.comp._wake.set()


class Comparator:
    """Runs comparisons off the event loop (child processes, or a thread with `processes=0`);
    `submit` and `record_divergence` are the only calls the event loop makes."""

    def __init__(
        self,
        store: Store,
        metrics: ComparisonCounter | None,
        queue_size: int = 256,
        *,
        queue_bytes: int = 64 * 1024**2,
        flush_interval: float = 1.0,
        batch: int = 500,
        sweep_interval: float | None = None,
        cpu_share: float = 0.1,
        processes: int = 1,
        nice: int = 0,
        priority: str = "idle",
        child_command: list[str] | None = None,
    ) -> None:
        if not 0.0 < cpu_share <= 1.0:
            raise ValueError("cpu_share must be in (0, 1]")
        if processes < 0:
            raise ValueError("processes must be >= 0")
        self.store = store
        self.metrics = metrics
        self.queue_size = queue_size
        #: body bytes the queued jobs may hold: with answers captured up to 1 MiB each, 256
        #: jobs alone could pin 512 MiB (see `has_room`)
        self.queue_bytes = queue_bytes
        self.flush_interval = flush_interval
        self.batch_size = batch
        retention = store.options.retention
        self.sweep_interval = (
            sweep_interval
            if sweep_interval is not None
            else max(1.0, min(SWEEP_INTERVAL_MAX, retention / 10))
        )
        #: At most this share of wall time is spent comparing, per feeder. With `processes: 0`
        #: the feeder holds the GIL while it lifts and diffs, so without a cap a flood of
        #: comparisons would take interpreter time from the event loop; with children it keeps
        #: each child to that share of a core. Past the cap the queue fills and jobs drop.
        self.cpu_share = cpu_share
        self._rest_ratio = 1.0 / cpu_share - 1.0
        #: comparison children, one per feeder thread; empty: the one feeder decides in-process
        per_field = store.options.examples_per_field
        self.children = [
            ChildProcess(child_command, nice, per_field, priority) for _ in range(processes)
        ]
        #: Jobs waiting. A deque, not a queue.Queue: `append` and `popleft` are atomic under
        #: the GIL, so a submit takes no lock and wakes no thread. A Queue's put notifies the
        #: waiting worker every time, and at thousands of jobs a second those wake-ups and the
        #: GIL hand-overs they cause cost the event loop more than the comparisons themselves
        #: (futex and context switches were half the proxy's CPU). The feeders poll instead.
        self._jobs: deque[CompareJob] = deque()
        #: body bytes of the jobs ever queued (written by `submit` only, on the loop) and of
        #: those taken off the queue (by the feeders, under `_stats_lock`): the difference is
        #: what the queue holds, kept without a lock on the loop's side
        self._bytes_in = 0
        self._bytes_out = 0
        #: decided (or lost: None) jobs, from the feeders to the collector that batches them
        self._decided: deque[tuple[Pending, Decision | None]] = deque()
        #: identical answers decided by `submit`, per (route, target), until the worker takes
        #: them (`_take_matches` swaps the dict under the lock)
        self._matches: dict[tuple[str, str], _MatchTally] = {}
        self._matches_lock = threading.Lock()
        #: divergence ledger entries waiting for the next flush: the same lock-free deque as
        #: `_jobs`, bounded by `queue_size` too
        self._divergences: deque[Divergence] = deque()
        #: accepted by submit (loop thread only) / decided and written (collector only)
        self._accepted = 0
        self._written = 0
        #: the same for ledger entries: recorded / written or given up on (by the collector)
        self._div_accepted = 0
        self._div_written = 0
        #: `stats` is counted by several threads (the loop, the feeders, the collector): a
        #: `+=` on a dict item is not atomic across threads
        self._stats_lock = threading.Lock()
        #: settings object id -> (the object, its token): children are sent each once
        self._tokens: dict[int, tuple[CompareSettings, int]] = {}
        self._tokens_lock = threading.Lock()
        self._next_token = 1
        self._wake = threading.Event()
        #: set by stop(): feeders stop resting and waiting
        self._stop_event = threading.Event()
        self._written_cond = threading.Condition()
        self._flush_asked = False
        #: batches a store write failed on, oldest first, written before the next one (worker
        #: only); at most `PENDING_BATCHES`, then the oldest is dropped and counted
        self._pending: deque[Batch] = deque()
        self._outage_since: float | None = None
        self._worker: threading.Thread | None = None
        self._feeders: list[threading.Thread] = []
        #: with a loop (`start(loop)`): the children's feeders run on it instead of threads
        self._loop_feeders: list[_LoopFeeder] = []
        self._stopping = False
        #: stop() ran out of time: what is still queued is dropped, not compared
        self._abandon = False
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
            #: comparison children that died with a job and were started again
            "restarts": 0,
            #: decisions that came with an example pair (the child builds them within a quota)
            "examples_built": 0,
        }

    @classmethod
    def from_config(
        cls, store: Store, metrics: ComparisonCounter | None, cfg: CompareConfig
    ) -> Comparator:
        """A comparator with the queue, batching and children of the `compare:` config block."""
        return cls(
            store,
            metrics,
            cfg.queue,
            queue_bytes=cfg.queue_bytes,
            flush_interval=cfg.flush_interval,
            batch=cfg.batch,
            cpu_share=cfg.cpu_share,
            processes=cfg.processes,
            nice=cfg.nice,
            priority=cfg.priority,
        )

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    # -- event loop side -----------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether a comparison begun now would likely be queued: asked when a compared
        request begins, before anything is captured, so that under a full queue the loop does
        not capture, join and build jobs only to drop them (most of what comparing cost the
        loop when every answer differed). It also keeps the compared requests a sample of the
        traffic: dropping only at `submit` kept every identical pair (decided on the loop) and
        dropped differing ones, biasing the match rate up exactly when the diffs were many."""
        return (
            not self._stopping
            and len(self._jobs) < self.queue_size
            and self._bytes_in - self._bytes_out < self.queue_bytes
        )

    def submit(self, job: CompareJob) -> bool:
        """Queue a job without blocking; False (and `dropped` counted) when full or stopped.

        Byte-identical answers (`identical_answers`, the common case) are decided here, on the
        loop: comparing two equal byte strings (a memcmp bounded by the capture cap, about
        50 us for 1 MiB) costs less than handing the job over. They are tallied (count and both
        latencies) and the collector takes the tally into its next batch, so they are stored
        and reported like every other comparison. Nothing else is parsed or diffed here.
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
        size = _body_bytes(job)
        held = self._bytes_in - self._bytes_out
        if len(self._jobs) >= self.queue_size or (held and held + size > self.queue_bytes):
            return self._drop(job)
        self._accepted += 1
        self.stats["submitted"] += 1
        self._bytes_in += size
        self._jobs.append(job)
        for feeder in self._loop_feeders:
            feeder.kick()
        return True

    def _drop(self, job: CompareJob | Pending) -> bool:
        self._count("dropped")
        if self.metrics is not None:
            self.metrics.comparison(job.route, job.target, "dropped")
        return False

    def record_divergence(self, d: Divergence) -> bool:
        """Queue a ledger entry for the next flush without blocking; False (and
        `ledger_dropped` counted) when the queue holds `queue_size` entries or the comparator
        stopped. Counting the divergence itself (`Metrics.divergence`) is the caller's: it
        knows what happened, this only keeps the record."""
        if self._stopping or len(self._divergences) >= self.queue_size:
            self._count("ledger_dropped")
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
    def queued_bytes(self) -> int:
        """Body bytes the waiting jobs hold (for a gauge; `queue_bytes` bounds it)."""
        return self._bytes_in - self._bytes_out

    @property
    def ledger_queued(self) -> int:
        """Ledger entries waiting for the next flush (for a gauge)."""
        return len(self._divergences)

    @property
    def children_alive(self) -> int:
        """Comparison children running now (for a gauge)."""
        return sum(1 for c in self.children if c.proc is not None)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> Comparator:
        """Start the collector and the feeders. With `loop` (called on its thread, as the
        proxy does) each child is fed from that loop (`_LoopFeeder`); without one, or with
        `processes: 0`, by feeder threads."""
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._run, name="shadowlane-comparator", daemon=True
            )
            if loop is not None and self.children:
                for owned in self.children:
                    feeder = _LoopFeeder(self, owned, loop)
                    try:
                        feeder.open()  # now, so the first comparison does not wait for it
                    except ChildDied as exc:
                        log.warning("%s; it is tried again at the next comparison", exc)
                    self._loop_feeders.append(feeder)
                self._worker.start()
                return self
            links: list[ChildProcess | None] = list(self.children) or [None]
            for i, child in enumerate(links):
                if child is not None:
                    try:
                        child.start()  # now, so the first comparison does not wait for it
                    except ChildDied as exc:
                        log.warning("%s; it is tried again at the next comparison", exc)
                self._feeders.append(
                    threading.Thread(
                        target=self._feed,
                        args=(child,),
                        name=f"shadowlane-compare-feeder-{i}",
                        daemon=True,
                    )
                )
            for t in self._feeders:
                t.start()
            self._worker.start()
        return self

    @property
    def pending_batches(self) -> int:
        """Batches waiting for the store to take them (it failed the last write)."""
        return len(self._pending)

    def stop(self, timeout: float = 10.0) -> bool:
        """Compare what is queued, flush, and join; False if that did not end in time (what
        is left is then dropped, counted, and the children are killed)."""
        self._stopping = True
        self._stop_event.set()
        thread = self._worker
        if thread is None:
            return True
        for feeder in self._loop_feeders:
            feeder.stopping()
        self._wake.set()
        thread.join(timeout)
        if not thread.is_alive():
            return True
        self._abandon = True
        if self._loop_feeders:
            for feeder in self._loop_feeders:
                feeder.abandon()  # on the loop, which owns those pipes
        else:
            for child in self.children:
                child.kill()
        thread.join(5.0)
        return False

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

    # -- feeders -------------------------------------------------------------------------------

    def _token(self, job: CompareJob) -> tuple[int, CompareSettings | None]:
        settings = job.settings if isinstance(job.settings, CompareSettings) else None
        if settings is None:
            return 0, None
        with self._tokens_lock:
            entry = self._tokens.get(id(settings))
            if entry is not None and entry[0] is settings:
                return entry[1], settings
            if len(self._tokens) >= SETTINGS_TOKENS_MAX:
                self._tokens.clear()  # tokens are never reused, so children cannot mix them up
            token = self._next_token
            self._next_token += 1
            self._tokens[id(settings)] = (settings, token)
            return token, settings

    def _feed(self, child: ChildProcess | None) -> None:
        """One feeder: take a job (with a child: a batch of what is queued), have it decided
        (by `child`, or here), hand on the decisions.

        It rests after each job or batch so that comparing takes at most `cpu_share` of its
        wall time, and waiting for work counts as rest already taken.
        """
        jobs = self._jobs
        owed = 0.0
        last_death = -RESTART_BACKOFF
        idle = True  # the child has waited since its last answer (see compare_batch)
        while True:
            try:
                job = jobs.popleft()
            except IndexError:
                if self._stopping:
                    break
                idle = True
                waited = time.monotonic()
                self._stop_event.wait(POLL_INTERVAL)
                owed = max(0.0, owed - (time.monotonic() - waited))
                continue
            if child is None:
                batch = [job]
                self._took(_body_bytes(job))
            else:
                batch = self._batch(job)
            del job
            pendings = [Pending.of(j) for j in batch]
            if self._abandon:
                del batch
                for pending in pendings:
                    self._settle(pending, None)
                continue
            started = time.perf_counter()
            decisions: list[Decision | None]
            if child is None:
                try:
                    decisions = [decide(batch[0])]
                except Exception:
                    log.exception("comparison of %s %s failed", batch[0].method, batch[0].uri)
                    decisions = [Decision("error", [], [])]
            else:
                tokens = [self._token(j) for j in batch]
                try:
                    decisions = list(child.compare_batch(batch, tokens, idle))
                except ChildDied as exc:
                    decisions = [None] * len(batch)
                    now = time.monotonic()
                    if not self._abandon:
                        log.warning("%s; its comparisons are dropped, starting another", exc)
                        self._count("restarts")
                        if now - last_death < RESTART_BACKOFF:
                            self._stop_event.wait(RESTART_BACKOFF)  # dying at once: slow down
                    last_death = now
            idle = False
            del batch  # the bodies go now, not when the next jobs come
            for pending, decision in zip(pendings, decisions, strict=True):
                self._settle(pending, decision)
            if child is None:
                spent = time.perf_counter() - started
            else:
                spent = sum(d.cpu for d in decisions if d is not None)
            owed += spent * self._rest_ratio
            # no resting once stop() was called: finishing the backlog quickly is what a
            # draining process needs, and the event loop is winding down anyway
            if owed >= REST_QUANTUM and not self._stopping:
                self._stop_event.wait(owed)
                owed = 0.0
                idle = True
        if child is not None:
            child.close()

    def _batch(self, first: CompareJob) -> list[CompareJob]:
        """`first` and the jobs queued behind it, up to `BATCH_JOBS` jobs and, past the first,
        `BATCH_BYTES` of bodies: handed to a child in one go (see ChildProcess.compare_batch).
        One job at a time cost the feeder a blocking read, and the GIL taken back from the
        event loop, per job: under a full queue its context switches cost as much CPU as the
        child's comparisons (measured per thread, compare-json-diff)."""
        batch = [first]
        size = _body_bytes(first)
        jobs = self._jobs
        while len(batch) < BATCH_JOBS and size < BATCH_BYTES:
            try:
                job = jobs.popleft()
            except IndexError:
                break
            batch.append(job)
            size += _body_bytes(job)
        self._took(size)
        return batch

    def _took(self, size: int) -> None:
        """`size` body bytes left the queue (any feeder's thread)."""
        with self._stats_lock:
            self._bytes_out += size

    def _settle(self, pending: Pending, decision: Decision | None) -> None:
        if decision is None:
            self._drop(pending)
        elif decision.result == "error":
            self._count("errors")
        else:
            self._count("compared")
            if decision.example is not None:
                self._count("examples_built")
            if self.metrics is not None:
                self.metrics.comparison(pending.route, pending.target, decision.result)
        self._decided.append((pending, decision))

    # -- collector -----------------------------------------------------------------------------

    def _run(self) -> None:
        batch = self._new_batch()
        next_flush = time.monotonic() + self.flush_interval
        next_sweep = time.monotonic()
        decided = self._decided
        while True:
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep()
                next_sweep = now + self.sweep_interval
            while decided:
                pending, decision = decided.popleft()
                batch.jobs += 1  # owed to wait_idle at the next flush, whatever it was
                if decision is not None and decision.result != "error":
                    try:
                        record_decision(batch, pending, decision)
                    except Exception:
                        log.exception("recording a comparison of %s failed", pending.route)
                if batch.jobs >= self.batch_size:
                    self._flush(batch)
                    batch = self._new_batch()
                    next_flush = time.monotonic() + self.flush_interval
            stopping = self._stopping
            fed = (
                stopping
                and not any(t.is_alive() for t in self._feeders)
                and all(f.finished.is_set() for f in self._loop_feeders)
            )
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
            if fed and not decided:
                self._flush(batch)  # whatever the last feeder handed over meanwhile
                while self._pending:
                    self._lose(self._pending.popleft(), "the store was down at shutdown")
                return
            self._wake.wait(min(POLL_INTERVAL, max(0.0, next_flush - time.monotonic())))
            self._wake.clear()

    def _new_batch(self) -> Batch:
        return Batch(examples_per_field=self.store.options.examples_per_field)

    def _take_matches(self, batch: Batch) -> None:
        with self._matches_lock:
            matches, self._matches = self._matches, {}
        for (route, target), tally in matches.items():
            batch.add_matches(route, target, tally.n)
            batch.jobs += tally.n
            self._count("compared", tally.n)
            for side, counts in (("primary", tally.primary), ("shadow", tally.shadow)):
                for bucket, n in counts.items():
                    batch.add_latency_count(route, target, side, bucket, n)

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
                self._count("write_errors")
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning(
                        "comparison store write failed (keeping up to %d batches to retry): %s",
                        PENDING_BATCHES,
                        exc,
                    )
                break
            pending.popleft()
            self._count("flushes")
            if self._outage_since is not None and not pending:
                log.warning(
                    "comparison store writable again after %.1fs; caught up",
                    time.monotonic() - self._outage_since,
                )
                self._outage_since = None
        while len(pending) > PENDING_BATCHES:
            self._lose(pending.popleft(), "waited past the retry bound")

    def _lose(self, batch: Batch, why: str) -> None:
        self._count("store_lost", batch.jobs)
        log.warning(
            "comparison store: %d results and %d ledger entries lost (%s)",
            batch.jobs,
            len(batch.divergences),
            why,
        )
        self._lost_divergences(batch.divergences)

    def _lost_divergences(self, entries: list[Divergence]) -> None:
        self._count("ledger_dropped", len(entries))
        if self.metrics is None:
            return
        per_pair: dict[tuple[str, str], int] = {}
        for d in entries:
            per_pair[(d.route, d.target)] = per_pair.get((d.route, d.target), 0) + 1
        for (route, target), n in per_pair.items():
            self.metrics.ledger_dropped(route, target, n)

    def _sweep(self) -> None:
        try:
            self._count("swept", self.store.sweep())
        except Exception as exc:
            log.warning("comparison store retention sweep failed: %s", exc)
