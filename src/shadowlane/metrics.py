"""Prometheus metrics for shadowlane, built to be cheap on the hot path.

The proxy records one or more samples per request at tens of thousands of requests per second.
`prometheus_client` costs about 2 us per request for a counter and a histogram (`.labels()`, a
lock per value, a Python loop over buckets), a fifth of what the whole compiled proxy spends. So
every recording method here keeps a plain dict from label tuple to a *tally* (native ints) and
only calls `.labels()` on a miss; the tallies reach prometheus_client in `flush()`: before each
render, every FLUSH_INTERVAL seconds, and at shutdown. A scrape of the process is exact; with
workers, another worker's counts are at most FLUSH_INTERVAL old.

Label values are validated on a miss only (for example an outcome must be one of
`SHADOW_OUTCOMES`): a typo fails loudly the first time, and costs nothing afterwards. The shadow
outcomes themselves are named in `shadow/outcomes.py` (re-exported here), where mypy checks every
caller against them before anything runs.

Multi-process (`--workers N`): prometheus_client's multiprocess mode keeps every counter and
histogram value in a per-process mmap file under a shared directory, and a scrape sums the files.
`Metrics(multiprocess_dir=...)` opts into it; only counters and histograms are recorded through
prometheus_client, everything else (build info, gauge providers) is a custom collector evaluated
by the process that renders, which keeps the design compatible with that mode. See
docs/metrics.md for the details and the limits.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from shadowlane import __version__
from shadowlane.shadow.outcomes import (
    DIVERGENCE_REASONS,
    SHADOW_OUTCOMES,
    DivergenceReason,
    Outcome,
)

__all__ = [
    "BUCKETS",
    "COMPARISON_RESULTS",
    "DIVERGENCE_REASONS",
    "NO_ROUTE",
    "RECORD_OUTCOMES",
    "SHADOW_OUTCOMES",
    "TUNNEL_CLOSE_REASONS",
    "UPGRADE_OUTCOMES",
    "GaugeProvider",
    "Metrics",
    "mark_process_dead",
    "reset_multiprocess_dir",
]

log = logging.getLogger(__name__)

#: How often counts reach prometheus_client when nothing scrapes this process (see `flush`).
FLUSH_INTERVAL = 0.5

#: Histogram upper bounds in seconds, shared by the primary and the shadow histograms so the two
#: latency distributions can be compared bucket by bucket (and divided in PromQL). From 0.5 ms (a
#: loopback backend) to 30 s (the default backend timeout); prometheus_client adds +Inf.
BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: Upper bounds of `shadowlane_loop_lag_seconds`: fine below 2 ms, where a healthy loop lives,
#: so a percentile like p99.9 < 2 ms can be read off the buckets.
LOOP_LAG_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)

#: What a comparison of a primary and a shadow answer found; see docs/metrics.md.
COMPARISON_RESULTS: tuple[str, ...] = ("match", "diff", "noise", "dropped")

#: What became of a request a recording saw; see docs/metrics.md and docs/recording.md.
#: `sampled_out`, `skipped_body` and `dropped` are counted on the event loop; `written` and
#: `error` by the record writer's thread.
RECORD_OUTCOMES: tuple[str, ...] = ("written", "dropped", "sampled_out", "skipped_body", "error")
_RECORD_LOOP_OUTCOMES = frozenset(("dropped", "sampled_out", "skipped_body"))
_RECORD_THREAD_OUTCOMES = frozenset(("written", "error"))

#: What became of an `Upgrade` request (WebSocket) a route was asked for; see docs/metrics.md.
UPGRADE_OUTCOMES: tuple[str, ...] = ("tunnelled", "declined", "failed", "not_allowed")
#: Why a tunnel ended: the client or the backend closed (or half-closed where the other side
#: cannot), no byte for the route's `tunnel_idle_timeout`, a drain or reload closed it, or a
#: connection failed under it.
TUNNEL_CLOSE_REASONS: tuple[str, ...] = ("client", "backend", "idle", "drain", "reload", "error")
_UPGRADE_OUTCOME_SET = frozenset(UPGRADE_OUTCOMES)
_TUNNEL_CLOSE_REASON_SET = frozenset(TUNNEL_CLOSE_REASONS)

#: Route and backend label value for requests that matched no route (answered 404).
NO_ROUTE = ""

#: Returns (label values, value) pairs; called at scrape time only.
GaugeProvider = Callable[[], Iterable[tuple[tuple[str, ...], float]]]

_SHADOW_OUTCOME_SET = frozenset(SHADOW_OUTCOMES)
_COMPARISON_RESULT_SET = frozenset(COMPARISON_RESULTS)
_DIVERGENCE_REASON_SET = frozenset(DIVERGENCE_REASONS)


class _CounterTally:
    """Increments of one labelled counter, kept as a plain int until the next flush.

    prometheus_client's `inc()` is interpreted Python that takes a lock (about 0.4 us); this is
    one native add. A request's counter tally also points at its route's duration histogram.
    """

    def __init__(self, child: Counter, duration: _HistogramTally | None = None) -> None:
        self.child = child
        self.n = 0
        self.duration: _HistogramTally = duration if duration is not None else _NO_HISTOGRAM

    def flush(self) -> None:
        n = self.take()
        if n:
            self.child.inc(n)

    def take(self) -> int:
        """The count since the last take, reset to 0."""
        n = self.n
        self.n = 0
        return n


class _HistogramTally:
    """Bucket counts and sum of one labelled histogram until the next flush.

    `observe()` in prometheus_client walks the buckets in Python and takes two locks (about
    1 us); here it is a C bisect and two adds. The bucket chosen is the same: the first upper
    bound >= the value, as `observe()` does. The flush writes the counts into the child's bucket
    values (`_buckets`, `_sum`: prometheus_client has no public bulk add), which is what makes
    them reach the multiprocess files too.
    """

    def __init__(self, child: Histogram | None) -> None:
        self.child = child
        self.buckets: list[int] = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.dirty = False

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.dirty = True

    def flush(self) -> None:
        child = self.child
        if not self.dirty or child is None:
            return
        buckets, total = self.buckets, self.sum
        self.buckets, self.sum, self.dirty = [0] * (len(BUCKETS) + 1), 0.0, False
        values = child._buckets
        for i, n in enumerate(buckets):
            if n:
                values[i].inc(n)
        child._sum.inc(total)


#: The duration slot of counter tallies that have none (shadow outcomes).
_NO_HISTOGRAM = _HistogramTally(None)


class _BuildInfoCollector:
    """`shadowlane_build_info{version} 1`, as a custom collector.

    A custom collector rather than a Gauge so that in multiprocess mode it is reported once by the
    rendering process instead of being summed over workers (which would say N, not 1).
    """

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "shadowlane_build_info",
            "Always 1; the version label says which shadowlane is running.",
            labels=("version",),
        )
        family.add_metric((__version__,), 1.0)
        yield family

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class _GaugeProviderCollector:
    """One gauge family whose samples come from a callback run at scrape time.

    Things like queue depth or pooled connections are state the owner already keeps; reading them
    when Prometheus asks costs nothing per request, unlike updating a Gauge on every change.
    """

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], fn: GaugeProvider) -> None:
        self.name = name
        self._doc = doc
        self._labels = labels
        self._fn = fn

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self._doc, labels=self._labels)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        try:
            for label_values, value in self._fn():
                family.add_metric(tuple(label_values), float(value))
        except Exception:
            # One broken provider must not take the whole scrape (and every other metric) down.
            log.exception("gauge provider %s failed; omitting it from this scrape", self.name)
            return
        yield family

    def describe(self) -> Iterator[Metric]:
        # Lets the registry reject a name clash at registration instead of at scrape time.
        yield self._family()


class _SharedGauge:
    """A gauge provider of one worker, written into a `livesum` Gauge at every flush.

    With workers, a scrape is answered by one process, and a provider evaluated there would see
    that worker's lanes only. So in multiprocess mode each worker writes its own values into
    prometheus_client's file-backed Gauge (`livesum`: summed over live processes) when it
    flushes, at most FLUSH_INTERVAL old; the supervisor marks an exited worker's files dead.
    """

    def __init__(self, gauge: Gauge, fn: GaugeProvider, seen: set[tuple[str, ...]]) -> None:
        self.gauge = gauge
        self.fn = fn
        #: label values written last time: those no longer reported are set back to 0
        self.seen = seen

    def publish(self) -> None:
        try:
            samples = [(tuple(labels), float(value)) for labels, value in self.fn()]
        except Exception:
            log.exception("gauge provider %s failed; not updated", self.gauge._name)
            return
        now: set[tuple[str, ...]] = set()
        for labels, value in samples:
            now.add(labels)
            self._child(labels).set(value)
        for labels in self.seen - now:
            self._child(labels).set(0.0)
        self.seen = now

    def clear(self) -> None:
        for labels in self.seen:
            self._child(labels).set(0.0)
        self.seen = set()

    def _child(self, labels: tuple[str, ...]) -> Gauge:
        return self.gauge.labels(*labels) if labels else self.gauge


def _enable_multiprocess(path: str) -> None:
    """Make prometheus_client record new metric values into mmap files under `path`.

    prometheus_client picks its value class once, at import, from PROMETHEUS_MULTIPROC_DIR. Any
    shadowlane module may import it before the CLI knows it will run workers, so rather than
    depending on import order we switch the value class here, before this `Metrics` creates its
    counters (the same switch prometheus_client's own tests make).
    """
    current = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if getattr(values.ValueClass, "_multiprocess", False):
        if current is not None and os.path.realpath(current) != os.path.realpath(path):
            raise ValueError(
                f"prometheus multiprocess mode is already on with PROMETHEUS_MULTIPROC_DIR="
                f"{current!r}; cannot also use {path!r}"
            )
        return
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def mark_process_dead(pid: int, path: str) -> None:
    """A worker exited: its `livesum` gauge files stop counting (counters keep their totals)."""
    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def reset_multiprocess_dir(path: str) -> None:
    """Create `path` if needed and delete metric files left by an earlier run.

    The supervisor calls this once before starting workers: files are per pid and are summed, so
    stale files from a previous run would otherwise be added to the new counts.
    """
    os.makedirs(path, exist_ok=True)
    for name in glob.glob(os.path.join(path, "*.db")):
        os.remove(name)


class Metrics:
    """All shadowlane metrics, with cached labelled children for the hot path.

    Single-process by default, with its own registry (tests make many instances, and the global
    default registry would reject duplicate names). With `multiprocess_dir`, counters and
    histograms go to mmap files in that directory and `render()` reports the sum over every
    process writing there.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        multiprocess_dir: str | None = None,
    ) -> None:
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            if not os.path.isdir(multiprocess_dir):
                raise ValueError(f"multiprocess_dir {multiprocess_dir!r} is not a directory")
            _enable_multiprocess(multiprocess_dir)
        #: Where this process's metric objects are registered.
        self.registry: CollectorRegistry = registry if registry is not None else CollectorRegistry()
        if multiprocess_dir is None:
            self._render_registry = self.registry
        else:
            # The per-process objects above only feed the mmap files; a scrape reads all files.
            self._render_registry = CollectorRegistry()
            MultiProcessCollector(self._render_registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]

        self._loop_lag = Histogram(
            "shadowlane_loop_lag_seconds",
            "How late the event loop woke a probe task that sleeps admin.loop_lag_probe at a "
            "time: what anything ready to run (a request) waited for the loop.",
            (),
            buckets=LOOP_LAG_BUCKETS,
            registry=self.registry,
        )
        self._requests = Counter(
            "shadowlane_requests",
            "Requests answered to clients, by route, primary backend and status code.",
            ("route", "backend", "code"),
            registry=self.registry,
        )
        self._request_duration = Histogram(
            "shadowlane_request_duration_seconds",
            "Time from request head received to response fully handed to the client.",
            ("route", "backend"),
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._shadow_requests = Counter(
            "shadowlane_shadow_requests",
            "Shadow copies by route, shadow target and outcome.",
            ("route", "target", "outcome"),
            registry=self.registry,
        )
        self._shadow_duration = Histogram(
            "shadowlane_shadow_duration_seconds",
            "Time from shadow request sent to shadow response fully read.",
            ("route", "target"),
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._comparisons = Counter(
            "shadowlane_comparisons",
            "Comparisons of primary and shadow answers by route, target and result.",
            ("route", "target", "result"),
            registry=self.registry,
        )
        self._divergences = Counter(
            "shadowlane_divergences",
            "Copies of ordered writes that may have left the target unlike the primary, by "
            "route, target and reason (each is a divergence ledger entry).",
            ("route", "target", "reason"),
            registry=self.registry,
        )
        self._ledger_dropped = Counter(
            "shadowlane_ledger_dropped",
            "Divergence ledger entries not stored: the ledger queue was full or the store "
            "write failed.",
            ("route", "target"),
            registry=self.registry,
        )
        self._records = Counter(
            "shadowlane_record",
            'Requests a recording saw, by route, shadow target ("" for the route\'s own) and '
            "outcome.",
            ("route", "target", "outcome"),
            registry=self.registry,
        )
        # upgrades and tunnels: a few per connection, not per request, so counted straight
        # into prometheus_client (no tallies)
        self._upgrades = Counter(
            "shadowlane_upgrades",
            "Upgrade requests (WebSocket) by route and outcome: tunnelled after a 101, "
            "declined by the backend, failed, or not allowed by the route (served plain).",
            ("route", "outcome"),
            registry=self.registry,
        )
        self._tunnels_closed = Counter(
            "shadowlane_tunnels_closed",
            "Tunnels (upgraded connections) that ended, by route and reason.",
            ("route", "reason"),
            registry=self.registry,
        )
        self._tunnel_bytes = Counter(
            "shadowlane_tunnel_bytes",
            "Bytes carried by tunnels that ended, by route and direction (upstream: client to "
            "backend; downstream: backend to client).",
            ("route", "direction"),
            registry=self.registry,
        )
        self._limited = Counter(
            "shadowlane_downstream_limited",
            "Client connections or requests a downstream limit ended, by limit: connections "
            "and fds (closed at accept), header_timeout and body_rate (408), overload (503).",
            ("limit",),
            registry=self.registry,
        )
        #: counted on the loop, flushed by it
        self._limited_tallies: dict[str, _CounterTally] = {}
        #: counted on the loop (no lock: the loop also flushes them)
        self._record_tallies: dict[tuple[str, str, str], _CounterTally] = {}
        #: counted by the record writer's thread: under `_record_lock`, as comparisons are
        self._record_thread_tallies: dict[tuple[str, str, str], _CounterTally] = {}
        self._record_lock = threading.Lock()
        self._render_registry.register(_BuildInfoCollector())

        # Label tuple -> tally of the labelled child. Plain dicts: a hit is the hot-path cost.
        self._request_tallies: dict[tuple[str, str, int], _CounterTally] = {}
        self._request_duration_tallies: dict[tuple[str, str], _HistogramTally] = {}
        self._shadow_tallies: dict[tuple[str, str, str], _CounterTally] = {}
        self._shadow_duration_tallies: dict[tuple[str, str], _HistogramTally] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        #: counted by the event loop and by the comparator thread: under `_comparison_lock`
        #: (uncontended almost always), so that no increment is lost to the flush's reset
        self._comparison_tallies: dict[tuple[str, str, str], _CounterTally] = {}
        self._comparison_lock = threading.Lock()
        #: divergences and ledger drops: rare, counted from the loop and from the comparator
        #: thread, so under `_comparison_lock` too
        self._divergence_tallies: dict[tuple[str, str, str], _CounterTally] = {}
        self._ledger_dropped_tallies: dict[tuple[str, str], _CounterTally] = {}
        self._providers: dict[str, _GaugeProviderCollector] = {}
        #: multiprocess mode: providers published through file-backed gauges (see _SharedGauge)
        self._shared_gauges: dict[str, _SharedGauge] = {}
        self._gauges: dict[str, Gauge] = {}

    # -- hot path -------------------------------------------------------------------------------

    def observe_request(self, route: str, backend: str, code: int, seconds: float) -> None:
        """Count one answered request and its duration (route=backend="" when nothing matched)."""
        tally = self._request_tallies.get((route, backend, code))
        if tally is None:
            tally = self._request_tally(route, backend, code)
        tally.n += 1
        tally.duration.observe(seconds)

    def shadow_outcome(self, route: str, target: str, outcome: Outcome, n: int = 1) -> None:
        """Count `n` shadow copies of `route` to `target` that ended in `outcome`."""
        tally = self._shadow_tallies.get((route, target, outcome))
        if tally is None:
            if outcome not in _SHADOW_OUTCOME_SET:
                raise ValueError(f"unknown shadow outcome {outcome!r}; one of {SHADOW_OUTCOMES}")
            self.declare_shadow(route, target)
            tally = self._shadow_tallies[(route, target, outcome)]
        tally.n += n

    def limit_hit(self, limit: str) -> None:
        """Count one connection or request a downstream limit ended (rare: not the hot path)."""
        tally = self._limited_tallies.get(limit)
        if tally is None:
            tally = self._limited_tallies[limit] = _CounterTally(self._limited.labels(limit))
        tally.n += 1

    def declare_limits(self, limits: Iterable[str]) -> None:
        """Create the limit series at zero, so `rate()` works before the first hit."""
        for limit in limits:
            if limit not in self._limited_tallies:
                self._limited_tallies[limit] = _CounterTally(self._limited.labels(limit))

    def record_outcome(self, route: str, target: str, outcome: str, n: int = 1) -> None:
        """Count `n` requests of a recording (on the event loop): sampled_out, skipped_body,
        dropped."""
        tally = self._record_tallies.get((route, target, outcome))
        if tally is None:
            if outcome not in _RECORD_LOOP_OUTCOMES:
                raise ValueError(f"not a record outcome counted on the loop: {outcome!r}")
            self.declare_record(route, target)
            tally = self._record_tallies[(route, target, outcome)]
        tally.n += n

    def record_written(self, route: str, target: str, outcome: str, n: int) -> None:
        """Count `n` records from the writer's thread: written, error."""
        if outcome not in _RECORD_THREAD_OUTCOMES:
            raise ValueError(f"not a record outcome counted by the writer: {outcome!r}")
        with self._record_lock:
            tally = self._record_thread_tallies.get((route, target, outcome))
            if tally is None:
                child = self._records.labels(route, target, outcome)
                tally = self._record_thread_tallies[(route, target, outcome)] = _CounterTally(child)
            tally.n += n

    def declare_record(self, route: str, target: str) -> None:
        """Create every outcome series of a recording at zero (at config load)."""
        for outcome in RECORD_OUTCOMES:
            key = (route, target, outcome)
            if outcome in _RECORD_LOOP_OUTCOMES:
                if key not in self._record_tallies:
                    child = self._records.labels(route, target, outcome)
                    self._record_tallies[key] = _CounterTally(child)
            else:
                with self._record_lock:
                    if key not in self._record_thread_tallies:
                        child = self._records.labels(route, target, outcome)
                        self._record_thread_tallies[key] = _CounterTally(child)

    def observe_shadow(self, route: str, target: str, seconds: float) -> None:
        """Record how long one shadow request to `target` took."""
        tally = self._shadow_duration_tallies.get((route, target))
        if tally is None:
            tally = self._shadow_duration_tallies[(route, target)] = _HistogramTally(
                self._shadow_duration.labels(route, target)
            )
        tally.observe(seconds)

    def _request_tally(self, route: str, backend: str, code: int) -> _CounterTally:
        duration = self._request_duration_tallies.get((route, backend))
        if duration is None:
            duration = self._request_duration_tallies[(route, backend)] = _HistogramTally(
                self._request_duration.labels(route, backend)
            )
        tally = _CounterTally(self._requests.labels(route, backend, str(code)), duration)
        self._request_tallies[(route, backend, code)] = tally
        return tally

    def flush(self) -> None:
        """Hand the tallies to prometheus_client (and so, with workers, to the shared files).

        Runs on the loop: before every render, every FLUSH_INTERVAL seconds, and at shutdown.
        The lists are copies because the comparator thread may declare a new pair meanwhile.
        """
        for counter in list(self._request_tallies.values()):
            counter.flush()
        for counter in list(self._shadow_tallies.values()):
            counter.flush()
        for counter in list(self._limited_tallies.values()):
            counter.flush()
        with self._comparison_lock:
            pending = [(c, c.take()) for c in self._comparison_tallies.values()]
            pending += [(c, c.take()) for c in self._divergence_tallies.values()]
            pending += [(c, c.take()) for c in self._ledger_dropped_tallies.values()]
        for counter in list(self._record_tallies.values()):
            counter.flush()
        with self._record_lock:
            pending += [(c, c.take()) for c in self._record_thread_tallies.values()]
        for counter, n in pending:
            if n:
                counter.child.inc(n)
        for histogram in list(self._request_duration_tallies.values()):
            histogram.flush()
        for histogram in list(self._shadow_duration_tallies.values()):
            histogram.flush()
        for shared in list(self._shared_gauges.values()):
            shared.publish()

    def start_flushing(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush every FLUSH_INTERVAL seconds, so that a scrape served by another worker is
        at most that much behind; a scrape of this process flushes first and is exact."""

        def tick() -> None:
            self.flush()
            self._flush_timer = loop.call_later(FLUSH_INTERVAL, tick)

        self.stop_flushing()
        self._flush_timer = loop.call_later(FLUSH_INTERVAL, tick)

    def stop_flushing(self) -> None:
        """Stop the periodic flush and flush what is left (a draining worker's last counts)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self.flush()

    def comparison(self, route: str, target: str, result: str) -> None:
        """Count one comparison result for `route` against shadow `target`."""
        with self._comparison_lock:
            tally = self._comparison_tallies.get((route, target, result))
            if tally is not None:
                tally.n += 1
                return
        if result not in _COMPARISON_RESULT_SET:
            raise ValueError(f"unknown comparison result {result!r}; one of {COMPARISON_RESULTS}")
        self.declare_shadow(route, target)
        with self._comparison_lock:
            self._comparison_tallies[(route, target, result)].n += 1

    def divergence(self, route: str, target: str, reason: DivergenceReason, n: int = 1) -> None:
        """Count `n` copies of `route` to `target` that diverged for `reason` (one of
        `DIVERGENCE_REASONS`); callable from any thread."""
        with self._comparison_lock:
            tally = self._divergence_tallies.get((route, target, reason))
            if tally is not None:
                tally.n += n
                return
        if reason not in _DIVERGENCE_REASON_SET:
            raise ValueError(f"unknown divergence reason {reason!r}; one of {DIVERGENCE_REASONS}")
        self.declare_ordered(route, target)
        with self._comparison_lock:
            self._divergence_tallies[(route, target, reason)].n += n

    def ledger_dropped(self, route: str, target: str, n: int = 1) -> None:
        """Count `n` ledger entries of `route` to `target` that were not stored; any thread."""
        with self._comparison_lock:
            tally = self._ledger_dropped_tallies.get((route, target))
            if tally is not None:
                tally.n += n
                return
        self.declare_ordered(route, target)
        with self._comparison_lock:
            self._ledger_dropped_tallies[(route, target)].n += n

    # -- upgrades and tunnels (per connection, off the per-request path) ---------------------

    def upgrade(self, route: str, outcome: str) -> None:
        """Count one upgrade request of `route` that ended in `outcome` (UPGRADE_OUTCOMES)."""
        if outcome not in _UPGRADE_OUTCOME_SET:
            raise ValueError(f"unknown upgrade outcome {outcome!r}; one of {UPGRADE_OUTCOMES}")
        self._upgrades.labels(route, outcome).inc()

    def tunnel_closed(self, route: str, reason: str, upstream: int, downstream: int) -> None:
        """Count one ended tunnel of `route` and the bytes it carried each way."""
        if reason not in _TUNNEL_CLOSE_REASON_SET:
            raise ValueError(
                f"unknown tunnel close reason {reason!r}; one of {TUNNEL_CLOSE_REASONS}"
            )
        self._tunnels_closed.labels(route, reason).inc()
        if upstream:
            self._tunnel_bytes.labels(route, "upstream").inc(upstream)
        if downstream:
            self._tunnel_bytes.labels(route, "downstream").inc(downstream)

    def declare_upgrades(self, route: str) -> None:
        """Create the upgrade and tunnel series of a route that allows upgrades, at zero."""
        for outcome in UPGRADE_OUTCOMES:
            self._upgrades.labels(route, outcome)
        for reason in TUNNEL_CLOSE_REASONS:
            self._tunnels_closed.labels(route, reason)
        for direction in ("upstream", "downstream"):
            self._tunnel_bytes.labels(route, direction)

    # -- setup and scrape -----------------------------------------------------------------------

    def observe_loop_lag(self, seconds: float) -> None:
        """One wake-up delay of the loop-lag probe (app/loop_probe.py); on the event loop."""
        self._loop_lag.observe(seconds)

    def declare_shadow(self, route: str, target: str) -> None:
        """Create every outcome and result series of a (route, target) pair, at zero.

        Series that appear only when they first become non-zero break `rate()` and ratios such as
        errors / sent (the first increment is invisible). The proxy may call this at config load;
        the recording methods call it on their first miss for a pair anyway.
        """
        for outcome in SHADOW_OUTCOMES:
            key = (route, target, outcome)
            if key not in self._shadow_tallies:
                child = self._shadow_requests.labels(route, target, outcome)
                self._shadow_tallies[key] = _CounterTally(child)
        with self._comparison_lock:
            for result in COMPARISON_RESULTS:
                pair = (route, target, result)
                if pair not in self._comparison_tallies:
                    child = self._comparisons.labels(route, target, result)
                    self._comparison_tallies[pair] = _CounterTally(child)

    def declare_ordered(self, route: str, target: str) -> None:
        """Create the divergence series of an ordered (or id-rewriting) shadow, every reason
        at zero, and its ledger drop series, as `declare_shadow` does for outcomes. Called for
        each such shadow when a config is loaded, and by the counting methods on a miss."""
        with self._comparison_lock:
            for reason in DIVERGENCE_REASONS:
                key = (route, target, reason)
                if key not in self._divergence_tallies:
                    child = self._divergences.labels(route, target, reason)
                    self._divergence_tallies[key] = _CounterTally(child)
            if (route, target) not in self._ledger_dropped_tallies:
                child = self._ledger_dropped.labels(route, target)
                self._ledger_dropped_tallies[(route, target)] = _CounterTally(child)

    def set_gauge_provider(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...],
        fn: GaugeProvider,
    ) -> None:
        """Publish gauge `name` whose samples `fn` returns at scrape time.

        Setting a provider for a name again replaces the previous one (a config reload rebuilds
        pools and lanes). `fn` runs on the thread that renders, which is the event loop for the
        admin server, so it may read loop-owned state without locks. With workers
        (`multiprocess_dir`), `fn` runs at every flush of this worker instead, and a scrape
        reports the sum over workers.
        """
        if self.multiprocess_dir is not None:
            gauge = self._gauges.get(name)
            if gauge is None:
                gauge = self._gauges[name] = Gauge(
                    name, doc, labels, registry=self.registry, multiprocess_mode="livesum"
                )
            previous = self._shared_gauges.get(name)
            seen = previous.seen if previous is not None else set()
            self._shared_gauges[name] = _SharedGauge(gauge, fn, seen)
            return
        old = self._providers.pop(name, None)
        if old is not None:
            self._render_registry.unregister(old)
        collector = _GaugeProviderCollector(name, doc, tuple(labels), fn)
        self._render_registry.register(collector)
        self._providers[name] = collector

    def remove_gauge_provider(self, name: str) -> None:
        """Stop publishing gauge `name` (no-op when it is not set)."""
        shared = self._shared_gauges.pop(name, None)
        if shared is not None:
            shared.clear()
        old = self._providers.pop(name, None)
        if old is not None:
            self._render_registry.unregister(old)

    def primary_figures(
        self, backends: Iterable[str], routes: Iterable[str] | None = None
    ) -> dict[str, tuple[dict[str, float], dict[float, float]]]:
        """Per primary backend (summed over routes and, with workers, over processes): answers
        by status code, and the duration histogram's cumulative bucket counts by upper bound.

        For the migration driver's flip gates, off the hot path: it reads what a scrape reads
        (so it runs on the loop, which owns the tallies). Counters only grow; the caller keeps
        the figures of a window's start and subtracts.
        """
        wanted = set(backends)
        on = set(routes) if routes is not None else None
        out: dict[str, tuple[dict[str, float], dict[float, float]]] = {b: ({}, {}) for b in wanted}
        self.flush()
        for metric in self._render_registry.collect():
            if metric.name not in ("shadowlane_requests", "shadowlane_request_duration_seconds"):
                continue
            for sample in metric.samples:
                backend = sample.labels.get("backend", "")
                if backend not in wanted or (
                    on is not None and sample.labels.get("route") not in on
                ):
                    continue
                codes, buckets = out[backend]
                if sample.name == "shadowlane_requests_total":
                    code = sample.labels.get("code", "")
                    codes[code] = codes.get(code, 0.0) + sample.value
                elif sample.name == "shadowlane_request_duration_seconds_bucket":
                    le = float(sample.labels.get("le", "+Inf"))
                    buckets[le] = buckets.get(le, 0.0) + sample.value
        return out

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        self.flush()
        return generate_latest(self._render_registry), CONTENT_TYPE_LATEST
