"""The replay itself: requests paced from the recording, sent, checked, compared, counted.

One event loop (uvloop when installed). The scheduler takes items from the source (read on a
thread, in batches, so a gzip file never stalls the loop), waits for each one's due time
(`pacing`), takes one of `--concurrency` slots, and starts it. A slot is held until the
request is done with: answered (or failed), checked, compared. So at most `--concurrency`
requests are in flight, and when the target or the comparisons are slower than the recording,
the replay falls behind (and says by how much) rather than queueing without bound.

Each request goes through its *lane*: how it is changed and checked. Replaying to a URL, the
lane applies the command line's mutations. Replaying as a configured shadow (`-c FILE --shadow
BACKEND`), each request is routed by the config's route table, first match wins, as the proxy
does, and takes the lane of its route's shadow to BACKEND: its mutations (`CopyBuilder`), its
`match:`, `max_body` and `only_if_primary`, and, for an ordered or id-rewriting shadow, its
write steps (`WritePlan`) in its ordering scope (`OrderScope`), shared by scope name across
routes like the dispatcher's. A write is admitted to its scope in the order its primary
answered (the source puts recorded writes in that order; a live `--primary`'s answers arrive in
it), its copy is built from the primary's answer (ids), sent when no earlier write with a
common key is pending, and checked at its end: whatever may have left the target unlike the
primary is a divergence, as in live shadowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import TextIO

from shadowlane.compare import Captured, CompareJob, CompareSettings
from shadowlane.config import BackendConfig, ShadowConfig
from shadowlane.metrics import Metrics
from shadowlane.record import FormatError
from shadowlane.replay.client import Answer, Target, build_pool
from shadowlane.replay.comparing import Comparisons
from shadowlane.replay.pacing import Pacer
from shadowlane.replay.progress import Progress
from shadowlane.replay.source import Counts, Filters, Item, Source, Window
from shadowlane.replay.summary import Side, Tally, Threshold
from shadowlane.routing import Predicate, RouteTable, compile_match
from shadowlane.shadow.join import EXAMPLE_REQUEST_BODY
from shadowlane.shadow.keys import OrderKeys
from shadowlane.shadow.mutation import CopyBuilder
from shadowlane.shadow.ordering import OrderScope, Waiter
from shadowlane.shadow.outcomes import (
    DIV_PRIMARY_UNUSABLE,
    DIV_SKIPPED_BODY,
    ERROR,
    OK,
    TIMEOUT,
    DivergenceReason,
    Ended,
)
from shadowlane.shadow.writes import ANSWER_LIMIT, Prepared, Unsent, WritePlan
from shadowlane.store import Store
from shadowlane.store.ledger import Divergence
from shadowlane.wire.messages import Request

#: items read from the recording per trip to the reader thread
READ_BATCH = 256


@dataclass(frozen=True)
class TargetSpec:
    """A target as the command line named it, before its pool exists."""

    role: str
    #: the backend name comparisons are stored under (a backend's name, or the URL's host:port)
    name: str
    #: what the user wrote, for messages
    label: str
    backend: BackendConfig


class Lane:
    """How the requests of one (route, shadow) are built, checked and compared."""

    def __init__(
        self,
        route: str,
        cfg: ShadowConfig,
        settings: CompareSettings,
        *,
        marker: bool,
        scope_name: str | None = None,
        as_shadow: bool = False,
    ) -> None:
        self.route = route
        self.cfg = cfg
        self.target = cfg.backend
        self.builder = CopyBuilder(cfg, route, marker=marker)
        self.settings = settings
        self.match: Predicate | None = compile_match(cfg.match) if cfg.match else None
        #: shadow limits and conditions apply only when replaying as a configured shadow
        self.max_body = cfg.max_body if as_shadow else None
        self.only_2xx = as_shadow and cfg.only_if_primary == "2xx"
        self.plan: WritePlan | None = None
        self.scope_name = scope_name
        self.scope: OrderScope | None = None

    @property
    def needs_answer(self) -> bool:
        """Its copies are built from, or checked against, the primary's answer."""
        return self.plan is not None or self.only_2xx


class Lanes:
    """Which lane a request takes: the one lane, or the lane of its route (by the table)."""

    def __init__(
        self,
        single: Lane | None = None,
        table: RouteTable | None = None,
        by_route: dict[str, Lane] | None = None,
    ) -> None:
        self.single = single
        self.table = table
        self.by_route = by_route or {}

    def all(self) -> list[Lane]:
        return [self.single] if self.single is not None else list(self.by_route.values())

    def lane(self, req: Request) -> Lane | None:
        if self.table is None:
            return self.single
        route = self.table.match(req)
        if route is None:
            return None
        return self.by_route.get(route.name)


@dataclass
class Setup:
    """Everything a replay needs, checked (built by `replay.command` from the arguments)."""

    files: list[str]
    window: Window
    filters: Filters
    lanes: Lanes
    #: None only for a dry run, which sends nothing
    to: TargetSpec | None
    primary: TargetSpec | None = None
    secondary: TargetSpec | None = None
    #: compare with the recorded answers (when there is no live primary)
    compare_recorded: bool = False
    speed: float = 1.0
    rate: float | None = None
    max_wait: float = 0.0
    loop: bool = False
    max_requests: int | None = None
    duration: float | None = None
    concurrency: int = 64
    timeout: float = 30.0
    keep_host: bool = False
    store: Store | None = None
    store_url: str | None = None
    threshold: Threshold = field(default_factory=Threshold)
    progress: TextIO | None = None

    @property
    def live(self) -> bool:
        return self.primary is not None

    @property
    def comparing(self) -> bool:
        return self.live or self.compare_recorded

    @property
    def writes(self) -> bool:
        """Some lane has write steps: they keep a divergence ledger (in the store)."""
        return any(ln.cfg.ordering or ln.cfg.ids_from_primary for ln in self.lanes.all())

    @property
    def needs_recorded_answers(self) -> bool:
        if self.live:
            return False
        return self.compare_recorded or any(ln.needs_answer for ln in self.lanes.all())


class CannotRun(Exception):
    """The replay could not start (a target unreachable); the message names what failed."""


def _cut(c: Captured, limit: int) -> Captured:
    """An answer as a comparison with capture cap `limit` would have captured it."""
    if len(c.body) <= limit:
        return c
    return Captured(c.status, c.headers, c.body[:limit], True, c.seconds, c.failure)


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Flight:
    """One request on its way; `failed` once for the summary whatever goes wrong."""

    __slots__ = ("failed", "item", "lane", "prep", "primary_known", "ready", "released", "waiter")

    def __init__(self, item: Item, lane: Lane) -> None:
        self.item = item
        self.lane = lane
        self.failed = False
        #: the write as the write steps built it (ordered or id-rewriting lanes)
        self.prep: Prepared | None = None
        #: the primary's answer was known when the write was built (it can be checked)
        self.primary_known = False
        self.waiter: Waiter | None = None
        self.ready: asyncio.Future[None] | None = None
        #: its slot was given back already (nothing was sent)
        self.released = False


class Runner:
    def __init__(self, setup: Setup) -> None:
        self.s = setup
        self.loop = asyncio.get_running_loop()
        if setup.to is None:
            raise CannotRun("no target to send to")
        self.tally = Tally(Side(setup.to.label))
        if setup.primary is not None:
            self.tally.primary = Side(setup.primary.label)
        if setup.secondary is not None:
            self.tally.secondary = Side(setup.secondary.label)
        self.metrics = Metrics()
        self._slots = asyncio.Semaphore(setup.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        #: why the replay could not go on (a recording that turned out unreadable), if it did not
        self.fatal = ""
        #: set when the replay ends: the background count (a thread) gives up
        self._ended = threading.Event()
        #: comparisons and the ledger's entries, written to the store on one thread
        self.comparisons = Comparisons(setup.store) if setup.comparing or setup.writes else None
        lanes = setup.lanes.all()
        scopes: dict[tuple[str, str], OrderScope] = {}
        for ln in lanes:
            if not ln.cfg.keeps_ledger:
                continue
            name = ln.scope_name or f"{ln.route}#replay"
            ln.plan = WritePlan(ln.cfg, ln.route, name, self.metrics, self._divergence)
            if ln.cfg.ordering is not None:
                key = (name, ln.target)
                if key not in scopes:
                    scopes[key] = OrderScope(name, ln.target)
                ln.scope = scopes[key]
        limit = max([ln.settings.max_body for ln in lanes] + [0])
        if any(ln.plan is not None for ln in lanes):
            limit = max(limit, ANSWER_LIMIT)
        self.capture_limit = limit
        self.to = self._target(setup.to)
        self.primary = self._target(setup.primary) if setup.primary else None
        self.secondary = self._target(setup.secondary) if setup.secondary else None
        # the recorded request sent to the live primary and secondary: no mutation, no marker
        plain = ShadowConfig(
            backend="primary", host_suffix="", host=None if setup.keep_host else "backend"
        )
        self.plain = CopyBuilder(plain, "replay", marker=False)

    def _target(self, spec: TargetSpec) -> Target:
        pool = build_pool(spec.name, spec.backend, self.s.concurrency)
        return Target(spec.role, spec.name, spec.label, pool, self.s.timeout, self.capture_limit)

    def targets(self) -> list[Target]:
        return [t for t in (self.to, self.primary, self.secondary) if t is not None]

    # ----- the ledger -----
    def _divergence(self, d: Divergence) -> bool:
        t = self.tally
        t.divergences[d.reason] = t.divergences.get(d.reason, 0) + 1
        if self.comparisons is not None:
            self.comparisons.record_divergence(d)
        return True

    def _diverged(self) -> int:
        return sum(self.tally.divergences.values())

    # ----- life cycle -----
    async def run(self) -> Tally:
        t = self.tally
        for target in self.targets():
            problem = await target.check()
            if problem:
                raise CannotRun(f"cannot reach --{target.role} {target.label}: {problem}")
        self._signals(True)
        progress_task = None
        counter = None
        if self.s.progress is not None:
            progress_task = asyncio.ensure_future(Progress(self.s.progress, t).run())
            counter = self.loop.run_in_executor(None, self._count)
        t.started = time.time()
        try:
            await self._schedule()
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        finally:
            self._signals(False)
            if progress_task is not None:
                progress_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress_task
            self._ended.set()
            if counter is not None:
                counter.cancel()
            if self.comparisons is not None:
                await self.comparisons.close()
            for target in self.targets():
                target.close()
            t.ended = time.time()
        return t

    def _signals(self, on: bool) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                if on:
                    self.loop.add_signal_handler(sig, self.stop, f"stopped by {sig.name}")
                else:
                    self.loop.remove_signal_handler(sig)

    def stop(self, why: str) -> None:
        """No new request starts; those in flight finish (a second signal abandons them)."""
        if not self._stop.is_set():
            self.tally.stopped = why
            self._stop.set()
            return
        if why.startswith("stopped by SIG") and self.tally.stopped.startswith("stopped by SIG"):
            self.tally.stopped = f"{why} twice: {len(self._tasks)} request(s) in flight abandoned"
            for task in list(self._tasks):
                task.cancel()

    def _count(self) -> None:
        """The progress bar's total: the requests one pass selects (a pass of its own)."""
        s = self.s
        n = 0
        for _ in self._source(Counts(), answers=False):
            n += 1
            if self._ended.is_set():
                return
        total = n if not s.loop else (s.max_requests or 0) or None
        if s.max_requests is not None and total is not None:
            total = min(total, s.max_requests)
        self.tally.total = total

    def _source(self, counts: Counts, answers: bool | None = None) -> Source:
        s = self.s
        need = s.needs_recorded_answers if answers is None else answers
        return Source(
            s.files,
            s.window.fresh(),
            s.filters,
            answers=need,
            answer_limit=self.capture_limit,
            by_answer_time=any(ln.plan is not None for ln in s.lanes.all()),
            counts=counts,
        )

    async def _batches(self, items: Iterator[Item]) -> list[Item]:
        return await self.loop.run_in_executor(None, lambda: list(islice(items, READ_BATCH)))

    async def _schedule(self) -> None:
        s = self.s
        t = self.tally
        pacer = Pacer(s.speed, s.rate, s.max_wait)
        t0 = self.loop.time()
        end = t0 + s.duration if s.duration is not None else None
        by_answer = any(ln.plan is not None for ln in s.lanes.all()) and not s.live
        n = 0
        while not self._stop.is_set():
            t.passes += 1
            counts = t.source if t.passes == 1 else Counts()
            items = iter(self._source(counts))
            pacer.new_pass()
            got = 0
            while not self._stop.is_set():
                try:
                    batch = await self._batches(items)
                except (FormatError, OSError) as exc:
                    self.fatal = str(exc)
                    self.stop(f"cannot read the recording: {exc}")
                    break
                if not batch:
                    break
                for item in batch:
                    got += 1
                    due = t0 + pacer.due(item.answered_ns if by_answer else item.ts_ns)
                    if end is not None and due >= end:
                        self.stop(f"--duration {s.duration:g}s reached")
                        break
                    delay = due - self.loop.time()
                    if delay > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), delay)
                    if self._stop.is_set():
                        break
                    await self._slots.acquire()
                    t.max_lag = max(t.max_lag, self.loop.time() - due)
                    t.scheduled += 1
                    self._begin(item)
                    n += 1
                    if s.max_requests is not None and n >= s.max_requests:
                        self.stop(f"--max-requests {s.max_requests} reached")
                        break
                    if self._stop.is_set():
                        break
            if not s.loop or got == 0:
                break

    # ----- one request -----
    def _begin(self, item: Item) -> None:
        """Called in schedule order, holding a slot: route, check, and (for a recorded
        primary answer) admit a write to its scope now, so scopes see the schedule's order."""
        req = item.rec.request
        lane = self.s.lanes.lane(req)
        if lane is None or (lane.match is not None and not lane.match(req)):
            self._release("not_routed")
            return
        body = item.rec.body
        if lane.max_body is not None and len(body) > lane.max_body:
            self._release("skipped_body")
            plan = lane.plan
            if plan is not None:
                keys = plan.unsent_keys(req, None)
                self._write_diverged(item, lane, keys, DIV_SKIPPED_BODY, "body too big to keep")
            return
        flight = _Flight(item, lane)
        if lane.needs_answer and not self.s.live and not self._prepare(flight, item.answer):
            return
        task = self.loop.create_task(self._fly(flight))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, skipped: str = "") -> None:
        if skipped:
            self.tally.skip(skipped)
        self._slots.release()

    def _write_diverged(
        self, item: Item, lane: Lane, keys: OrderKeys, reason: DivergenceReason, detail: str
    ) -> None:
        """A write that is not sent: its keys are suspect (a failure of this request)."""
        plan = lane.plan
        if plan is None:
            return
        before = self._diverged()
        req = item.rec.request
        uri = req.target.decode("latin-1")
        plan.diverged(keys, reason, item.id, req.method, uri, detail)
        if self._diverged() > before:
            self.tally.failed(item.id, req.method, uri, f"divergence: {reason}: {detail}")

    def _prepare(self, f: _Flight, answer: Captured | None) -> bool:
        """The primary's answer is known (recorded, or live): apply `only_if_primary`, build
        the write and admit it to its scope. False when nothing is to be sent (slot freed)."""
        lane = f.lane
        item = f.item
        req = item.rec.request
        usable = answer is not None and not answer.failure
        if lane.only_2xx and not (usable and answer is not None and 200 <= answer.status < 300):
            self._release("skipped_status")
            return False
        plan = lane.plan
        if plan is None:
            return True
        status = answer.status if answer is not None and usable else 0
        prep = plan.prepare(req, item.rec.body, status, answer if usable else None)
        if isinstance(prep, Unsent):
            self._release("skipped_answer" if prep.divergent else "skipped_status")
            if prep.divergent:
                self._write_diverged(item, lane, prep.keys, DIV_PRIMARY_UNUSABLE, prep.reason)
            return False
        f.prep = prep
        f.primary_known = usable
        scope = lane.scope
        if scope is not None:
            ready: asyncio.Future[None] = self.loop.create_future()
            f.waiter = scope.waiter(prep.keys, lambda: _set(ready))
            if not scope.admit(f.waiter):
                f.ready = ready  # an earlier write with a common key is pending: its turn comes
        return True

    async def _fly(self, f: _Flight) -> None:
        s = self.s
        item = f.item
        rec = item.rec
        req = rec.request
        uri = req.target.decode("latin-1")
        primary: asyncio.Task[Answer] | None = None
        secondary: asyncio.Task[Answer] | None = None
        try:
            if self.primary is not None:
                primary = self.loop.create_task(self._send_plain(self.primary, item))
            if self.secondary is not None:
                secondary = self.loop.create_task(self._send_plain(self.secondary, item))
            primary_answer = item.answer
            if primary is not None and f.lane.needs_answer:
                # like a live copy: built and admitted once the primary has answered
                primary_answer = (await primary).captured
                if not self._prepare(f, primary_answer):
                    f.released = True
                    if secondary is not None:
                        await secondary
                    return
            if f.ready is not None:
                await f.ready
            answer = await self._send(f)
            self._finished(f, answer)
            if f.waiter is not None and f.lane.scope is not None:
                waiter, f.waiter = f.waiter, None
                f.lane.scope.release(waiter)
            if answer.failure:
                self._fail(f, f"{answer.failure}: {answer.detail}")
            if s.comparing:
                if primary is not None:
                    primary_answer = (await primary).captured
                second = (await secondary).captured if secondary is not None else None
                await self._compare(f, primary_answer, answer.captured, second, uri)
        finally:
            for side in (primary, secondary):
                if side is not None and not side.done():
                    side.cancel()  # abandoned (a second signal): the side requests go too
            if f.waiter is not None and f.lane.scope is not None:
                f.lane.scope.release(f.waiter)
                f.waiter = None
            if not f.released:
                self._slots.release()

    def _fail(self, f: _Flight, why: str) -> None:
        if not f.failed:
            f.failed = True
            req = f.item.rec.request
            self.tally.failed(f.item.id, req.method, req.target.decode("latin-1"), why)

    async def _send_plain(self, target: Target, item: Item) -> Answer:
        rec = item.rec
        ep = target.pick()
        head = self.plain.head(rec.request, rec.headers, len(rec.body), ep.authority)
        answer = await target.send(ep, rec.request.method, head, rec.body)
        side = self.tally.primary if target is self.primary else self.tally.secondary
        if side is not None:
            side.add(answer.captured.status, answer.failure)
        return answer

    async def _send(self, f: _Flight) -> Answer:
        rec = f.item.rec
        req = rec.request
        ep = self.to.pick()
        prep = f.prep
        if prep is None:
            method, body = req.method, rec.body
            head = f.lane.builder.head(req, rec.headers, len(body), ep.authority)
        else:
            method, body = prep.method, prep.body
            head = f.lane.builder.head(
                req, rec.headers, len(body), ep.authority, prep.method, prep.target
            )
        t = self.tally
        now = time.time()
        if t.first_send is None:
            t.first_send = now
        t.last_send = now
        answer = await self.to.send(ep, method, head, body)
        t.to.add(answer.captured.status, answer.failure)
        return answer

    def _finished(self, f: _Flight, answer: Answer) -> None:
        """The write steps' end check (divergences), as a live copy's end."""
        prep = f.prep
        plan = f.lane.plan
        if prep is None or plan is None:
            return
        c = answer.captured
        end: Ended = OK if not c.failure else (TIMEOUT if c.failure == "timeout" else ERROR)
        if end == OK and not f.primary_known:
            self.tally.unchecked += 1  # nothing to check it against
            return
        before = self._diverged()
        req = f.item.rec.request
        uri = req.target.decode("latin-1")
        plan.finished(prep, end, c.status, c if end == OK else None, f.item.id, uri)
        if self._diverged() > before and end == OK:
            self._fail(f, "divergence: the target's answer disagrees with the primary's")

    async def _compare(
        self,
        f: _Flight,
        primary: Captured | None,
        candidate: Captured,
        secondary: Captured | None,
        uri: str,
    ) -> None:
        t = self.tally
        if primary is None:
            t.unanswered += 1
            return
        lane = f.lane
        limit = lane.settings.max_body
        req = f.item.rec.request
        job = CompareJob(
            route=lane.route,
            target=self.to.name,
            request_id=req.request_id or f.item.id,
            method=req.method,
            uri=uri,
            request_body=f.item.rec.body[:EXAMPLE_REQUEST_BODY],
            primary=_cut(primary, limit),
            candidate=_cut(candidate, limit),
            secondary=_cut(secondary, limit) if secondary is not None else None,
            settings=lane.settings,
            ts=time.time(),
        )
        if self.comparisons is None:
            return
        decided = await self.comparisons.decide(job, lane.settings)
        t.compared += 1
        if decided.result == "match":
            t.matched += 1
        elif decided.result == "noise":
            t.noise += 1
        else:
            t.differing += 1
            self._fail(f, "differs: " + ", ".join(decided.differing[:5]))


async def replay(setup: Setup) -> Tally:
    """Run one replay on the running loop; its counts."""
    return await Runner(setup).run()
