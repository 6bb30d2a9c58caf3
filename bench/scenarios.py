"""The scenarios and the loop that runs them.

A scenario is a shadow setup (which shadow targets, comparison or not) plus a load, measured on
several proxies. Scenarios sharing a setup share one start of the proxy; setups run one after
the other, and within a setup the proxies run back to back (nginx, shadowlane 1w, 2w), so the
figures compared with each other are taken close in time on this noisy machine.

Scenarios a target divides by each other (`PAIRED`: compare against the same shadow without,
recording against no recording, ordered against unordered writes) have different setups, so
they would run one after the other, a minute apart: a burst of load from a neighbour on this
shared machine then lands on one side of the ratio only (the same scenario measured 12.8k and
18.7k req/s in two runs ten minutes apart). Their setups are started together and their runs
interleaved like the proxies' are.
"""

from __future__ import annotations

import fnmatch
import statistics
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loadgen import Load, RunResult, run_load
from procs import RssSampler, StartError, Supervisor, tree_cpu
from servers import Backends, RunningProxy, shadow_outcomes, start_proxy

PROXIES_ALL = ("direct", "nginx", "shadowlane-1w", "shadowlane-2w")
PROXIES = ("nginx", "shadowlane-1w", "shadowlane-2w")
SHADOWLANE = ("shadowlane-1w", "shadowlane-2w")
FIXED_RATE = 5000


@dataclass(frozen=True)
class Scenario:
    id: str
    group: str
    title: str
    shadows: tuple[str, ...] = ()
    compare: bool = False
    #: the route records every request: "gzip" (`record: {dir: ...}`, the defaults) or "plain"
    #: (`gzip: false`); "" records nothing
    record: str = ""
    load: Load = field(default_factory=Load)
    proxies: tuple[str, ...] = PROXIES
    duration: float | None = None  # seconds per run; None: the run's --duration
    runs: int | None = None  # None: the run's --runs
    #: the proxies listen HTTP/2 too (nginx `listen ... http2`, shadowlane `listen_http2`)
    http2: bool = False
    #: the primary is the gRPC backend (nginx `grpc_pass`, shadowlane `protocol: h2c`)
    grpc: bool = False
    #: the route's primary backend: "fast" (a small text answer) or "json" (servers.py)
    primary: str = "fast"

    @property
    def setup(self) -> Setup:
        return self.shadows, self.compare, self.record, self.http2, self.grpc, self.primary


#: shadows, compare, record, http2, grpc, primary: what one start of the proxies serves
Setup = tuple[tuple[str, ...], bool, str, bool, bool, str]

#: scenarios whose figures a target divides by each other's (report.py): measured together,
#: their runs interleaved (see the module's docstring)
PAIRED: tuple[tuple[str, ...], ...] = (
    ("shadow-fast", "shadow-compare"),
    ("shadow-json", "compare-json-diff"),
    ("no-shadow", "record-100", "record-100-gzip"),
    ("writes-unordered", "writes-ordered"),
    # the p99 at a fixed rate with a slow or hung shadow over the same without: the no-shadow
    # p99 moved from 3.5 to 5.7 ms between two runs of one build, which alone failed a target
    ("rate-none", "rate-slow", "rate-hung"),
)

RATE_LOAD = Load(connections=50, rate=FIXED_RATE)  # h2load: 50 clients x 100 req/s
#: HTTP/2 closed loop (h2load): 10 connections x 10 streams = 100 requests in flight
H2_LOAD = Load(connections=10, protocol="h2", streams=10)
GRPC_LOAD = Load(connections=10, protocol="grpc", streams=10)


SCENARIOS: tuple[Scenario, ...] = (
    # Throughput: wrk, 50 connections, small GETs.
    Scenario("no-shadow", "throughput", "no shadow", proxies=PROXIES_ALL),
    Scenario("shadow-fast", "throughput", "100% shadow to fast", ("fast",)),
    Scenario("shadow-slow", "throughput", "100% shadow to slow (200 ms)", ("slow",)),
    Scenario("shadow-dead", "throughput", "100% shadow to dead port", ("dead",)),
    Scenario("shadow-hung", "throughput", "100% shadow to hung", ("hung",)),
    Scenario(
        "shadow-compare",
        "throughput",
        "100% shadow to fast, compare: true",
        ("fast",),
        compare=True,
        proxies=SHADOWLANE,
    ),
    # Comparing answers that differ (issue 17): ~4 KB JSON documents from nginx, the shadow's
    # differing in 4 fields, so every compared pair is parsed and diffed (in the comparison
    # child); judged against the same shadow without compare
    Scenario(
        "shadow-json",
        "throughput",
        "JSON answers, 100% shadow to json-diff",
        ("json-diff",),
        proxies=SHADOWLANE,
        primary="json",
    ),
    Scenario(
        "compare-json-diff",
        "throughput",
        "JSON answers, 100% shadow to json-diff, compare: true (all differ)",
        ("json-diff",),
        compare=True,
        proxies=SHADOWLANE,
        primary="json",
    ),
    # Recording (issue 13): the no-shadow load with every request recorded (the default,
    # plain files), judged against shadowlane's own no-shadow figure (nginx's proxy_pass sits
    # beside it); and with `gzip: true`, to show what compression costs
    Scenario(
        "record-100",
        "throughput",
        "no shadow, 100% recorded",
        record="plain",
        proxies=SHADOWLANE,
    ),
    Scenario(
        "record-100-gzip",
        "throughput",
        "no shadow, 100% recorded (gzip: true)",
        record="gzip",
        proxies=SHADOWLANE,
    ),
    # HTTP/2 from clients (issue 15): h2load with prior knowledge to nginx `listen ... http2`
    # and shadowlane `listen_http2`; backends stay HTTP/1.1 (nginx `mirror` for the shadow)
    Scenario("h2-no-shadow", "http2", "HTTP/2, no shadow", load=H2_LOAD, http2=True),
    Scenario(
        "h2-shadow-fast",
        "http2",
        "HTTP/2, 100% shadow to fast",
        ("fast",),
        load=H2_LOAD,
        http2=True,
    ),
    # gRPC unary, HTTP/2 end to end: nginx `grpc_pass`, shadowlane `protocol: h2c`
    Scenario("grpc-unary", "http2", "gRPC unary, no shadow", load=GRPC_LOAD, grpc=True),
    # Latency at a fixed offered load (h2load --rps).
    Scenario("rate-none", "fixed-load", "no shadow", load=RATE_LOAD, proxies=PROXIES_ALL),
    Scenario("rate-slow", "fixed-load", "100% shadow to slow (200 ms)", ("slow",), load=RATE_LOAD),
    Scenario("rate-hung", "fixed-load", "100% shadow to hung", ("hung",), load=RATE_LOAD),
    # How cost grows (always 100% shadowing to fast). 1 MiB bodies last: the proxy's RSS after
    # them would otherwise show up in the next scenario's figure.
    Scenario("shadows-2", "shadows", "2 shadows to fast", ("fast",) * 2),
    Scenario("shadows-4", "shadows", "4 shadows to fast", ("fast",) * 4),
    Scenario(
        "conns-10",
        "connections",
        "10 connections, shadow to fast",
        ("fast",),
        load=Load(connections=10),
    ),
    Scenario(
        "conns-100",
        "connections",
        "100 connections, shadow to fast",
        ("fast",),
        load=Load(connections=100),
    ),
    Scenario(
        "conns-1000",
        "connections",
        "1000 connections, shadow to fast",
        ("fast",),
        load=Load(connections=1000),
        # its p99 against nginx's is a target, and run to run it moves by a third: more runs
        runs=5,
    ),
    Scenario(
        "body-100B", "body", "POST 100 B, shadow to fast", ("fast",), load=Load(body_bytes=100)
    ),
    Scenario(
        "body-10KiB",
        "body",
        "POST 10 KiB, shadow to fast",
        ("fast",),
        load=Load(body_bytes=10 << 10),
    ),
    Scenario(
        "body-1MiB", "body", "POST 1 MiB, shadow to fast", ("fast",), load=Load(body_bytes=1 << 20)
    ),
    # Writes with disjoint keys (a new path each): ordering by key in a scope beside plain
    # shadowing of the same load; what it costs the primary path (req/s, p99)
    Scenario(
        "writes-unordered",
        "writes",
        "PUT distinct paths, shadow to fast",
        ("fast",),
        load=Load(distinct_writes=True),
    ),
    Scenario(
        "writes-ordered",
        "writes",
        "PUT distinct paths, shadow to fast ordered by path",
        ("fast-ordered",),
        load=Load(distinct_writes=True),
    ),
    # Memory: hung shadow, 60 s of wrk load, one run.
    Scenario(
        "memory-hung",
        "memory",
        "hung shadow, 60 s under load",
        ("hung",),
        proxies=("shadowlane-1w",),
        duration=60,
        runs=1,
    ),
)


def select(patterns: Iterable[str] | None, proxies: Iterable[str] | None) -> list[Scenario]:
    """Scenarios whose id or group matches one of the glob `patterns` (all when None)."""
    pats = list(patterns or ["*"])
    chosen = [
        s
        for s in SCENARIOS
        if any(fnmatch.fnmatch(s.id, p) or fnmatch.fnmatch(s.group, p) for p in pats)
    ]
    if proxies:
        keep = set(proxies)
        chosen = [replace(s, proxies=tuple(p for p in s.proxies if p in keep)) for s in chosen]
        chosen = [s for s in chosen if s.proxies]
    return chosen


GROWTH_GROUPS = ("shadows", "body", "connections")


@dataclass
class Settings:
    duration: float  # seconds per run: throughput and fixed-load scenarios
    growth_duration: float  # seconds per run: the cost-growth scenarios
    warmup: float
    runs: int
    work: Path


def runs_of(s: Scenario, settings: Settings) -> int:
    """The scenario's own `runs`, else the run's; `--quick` (one run each) is a smoke test, so
    it wins over a scenario that asks for more runs than the default."""
    if s.runs is None:
        return settings.runs
    return min(s.runs, settings.runs) if settings.runs == 1 else s.runs


def run_time(s: Scenario, settings: Settings) -> float:
    if s.duration:
        return s.duration
    return settings.growth_duration if s.group in GROWTH_GROUPS else settings.duration


def estimate_seconds(scenarios: list[Scenario], settings: Settings) -> float:
    """Wall time: warm-up + runs per figure, tool start-up, plus a proxy start per setup."""
    total = 0.0
    setups: set[tuple[Setup, str]] = set()
    for s in scenarios:
        runs = runs_of(s, settings)
        per = settings.warmup + 0.1 + runs * (run_time(s, settings) + 0.15)
        total += per * len(s.proxies)
        setups.update((s.setup, p) for p in s.proxies)
    return total + 0.8 * len(setups) + 3.0


@dataclass
class Measurement:
    scenario: str
    group: str
    title: str
    proxy: str
    load: str
    status: str = "ok"  # ok | n/a | failed
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    rps_spread_pct: float | None = None  # half the range of req/s over the runs, % of median
    peak_rss_mb: float | None = None
    #: CPU microseconds per request served (median over the runs) of the proxy's processes,
    #: and of its comparison children apart (procs.tree_cpu)
    cpu_us: float | None = None
    compare_cpu_us: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    shadow_outcomes: dict[str, float] | None = None
    rss_timeline: list[tuple[float, float]] | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _delta(after: dict[str, float] | None, before: dict[str, float] | None) -> dict[str, float]:
    if after is None:
        return {}
    before = before or {}
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v - before.get(k, 0.0)}


class ProxyDied(RuntimeError):
    pass


@dataclass
class _Series:
    """The runs of one scenario on one proxy, while they are being taken."""

    proxy: RunningProxy
    m: Measurement
    results: list[RunResult] = field(default_factory=list)
    rss: list[float | None] = field(default_factory=list)
    before: dict[str, float] | None = None

    def fail(self, status: str, note: str) -> None:
        self.m.status, self.m.note = status, note

    def finish(self) -> Measurement:
        m = self.m
        if m.status == "ok":
            m.rps = _median([r.rps for r in self.results])
            m.p50_ms = _median([r.p50_ms for r in self.results])
            m.p99_ms = _median([r.p99_ms for r in self.results])
            m.peak_rss_mb = _median(self.rss)
            m.cpu_us = _median([r.get("cpu_us") for r in m.runs])
            m.compare_cpu_us = _median([r.get("compare_cpu_us") for r in m.runs])
            rates = [r.rps for r in self.results]
            if len(rates) > 1 and m.rps:
                m.rps_spread_pct = round(50 * (max(rates) - min(rates)) / m.rps, 1)
            for r in self.results:
                for k, v in r.errors.items():
                    m.errors[k] = m.errors.get(k, 0) + v
            m.shadow_outcomes = _delta(shadow_outcomes(self.proxy), self.before) or None
        return m


def _check_alive(proxy: RunningProxy) -> None:
    if proxy.proc and not proxy.proc.alive():
        raise ProxyDied(
            f"{proxy.label} died (exit {proxy.proc.popen.returncode}): {proxy.proc.log_tail()}"
        )


def _one_run(series: _Series, s: Scenario, settings: Settings) -> None:
    proxy = series.proxy
    sampler = RssSampler(proxy.proc.pid) if proxy.proc else None
    cpu0 = tree_cpu(proxy.proc.pid) if proxy.proc else None
    if sampler:
        sampler.start(reset_peak=s.group != "memory")
    try:
        result = run_load(proxy.url, s.load, run_time(s, settings), settings.work)
    finally:
        mem = sampler.stop() if sampler else {}
    cpu: dict[str, float] = {}
    if proxy.proc and cpu0 is not None and result.requests:
        # the shadow copies still in flight when the load stops are a sliver of a run's
        cpu1 = tree_cpu(proxy.proc.pid)
        per = 1e6 / result.requests
        cpu["cpu_us"] = round((cpu1["proxy"] - cpu0["proxy"]) * per, 1)
        cpu["compare_cpu_us"] = round((cpu1["compare"] - cpu0["compare"]) * per, 1)
    series.results.append(result)
    series.rss.append(mem.get("peak_rss_mb"))
    series.m.runs.append({**result.to_json(), **mem, **cpu})
    if sampler and s.group == "memory":
        series.m.rss_timeline = [(t, round(kib / 1024, 1)) for t, kib in sampler.timeline]
    _check_alive(proxy)


def measure(entries: list[tuple[RunningProxy, Scenario]], settings: Settings) -> list[Measurement]:
    """Warm up every proxy, then take the runs round-robin (nginx, 1w, 2w, nginx, ...).

    Interleaving spreads slow changes in the background load of a shared machine over all the
    proxies alike, instead of letting them land on whichever proxy ran during them; the order
    turns round every other round, so a steady drift does too. `entries`
    are one scenario on several proxies, or the `PAIRED` scenarios on theirs.
    """
    series = [
        (_Series(p, Measurement(s.id, s.group, s.title, p.kind, s.load.describe())), s)
        for p, s in entries
    ]
    for x, s in series:
        try:
            _check_alive(x.proxy)
            run_load(x.proxy.url, s.load, settings.warmup, settings.work)  # discarded
            x.before = shadow_outcomes(x.proxy)
        except Exception as exc:
            x.fail("failed", f"warm-up: {type(exc).__name__}: {_one_line(str(exc))}")
    rounds = max(runs_of(s, settings) for _, s in series)
    for i in range(rounds):
        # every other round in reverse (nginx, 1w, 2w, 2w, 1w, nginx, ...): a machine that
        # slows down or speeds up through the rounds then weighs on every proxy alike, where
        # one order always would put the later ones on the slower side of it
        for x, s in series if i % 2 == 0 else series[::-1]:
            if x.m.status != "ok" or i >= runs_of(s, settings):
                continue
            try:
                _one_run(x, s, settings)
            except ProxyDied as exc:
                x.fail("failed", f"crashed: {_one_line(str(exc))}")
            except Exception as exc:  # a load tool failed; the other proxies go on
                traceback.print_exc()
                x.fail("failed", f"{type(exc).__name__}: {_one_line(str(exc))}")
    return [x.finish() for x, _ in series]


def batches(scenarios: list[Scenario]) -> list[list[list[Scenario]]]:
    """The scenarios in the order they run: batches of setups started together, each batch a
    list of measuring steps (one scenario, or the `PAIRED` ones whose runs interleave)."""
    partner: dict[str, int] = {sid: i for i, group in enumerate(PAIRED) for sid in group}
    out: list[list[list[Scenario]]] = []
    batch_of: dict[Setup, int] = {}
    step_of: dict[int, list[Scenario]] = {}
    for s in scenarios:
        pair = partner.get(s.id)
        if pair is not None and pair in step_of:
            step_of[pair].append(s)
            batch_of.setdefault(s.setup, batch_of[step_of[pair][0].setup])
            continue
        if s.setup not in batch_of:
            batch_of[s.setup] = len(out)
            out.append([])
        step = [s]
        if pair is not None:
            step_of[pair] = step
        out[batch_of[s.setup]].append(step)
    return out


def run_all(
    scenarios: list[Scenario],
    settings: Settings,
    sup: Supervisor,
    backends: Backends,
    on_result: Callable[[Measurement], None],
) -> dict[str, str]:
    """Run every scenario, batch by batch; returns the proxy configs used (name -> text)."""
    configs: dict[str, str] = {}
    for steps in batches(scenarios):
        _run_batch(steps, settings, sup, backends, on_result, configs)
    return configs


def _run_batch(
    steps: list[list[Scenario]],
    settings: Settings,
    sup: Supervisor,
    backends: Backends,
    on_result: Callable[[Measurement], None],
    configs: dict[str, str],
) -> None:
    """Start every proxy the batch's setups need side by side, measure, stop them."""
    setups: list[Setup] = []
    for step in steps:
        setups.extend(s.setup for s in step if s.setup not in setups)
    running: dict[tuple[Setup, str], RunningProxy] = {}
    broken: dict[tuple[Setup, str], Measurement] = {}
    try:
        for setup in setups:
            _start_setup(setup, steps, settings, sup, backends, running, broken, configs)
        for step in steps:
            live = [
                (running[(s.setup, k)], s)
                for s in step
                for k in s.proxies
                if (s.setup, k) in running
            ]
            done = {(m.scenario, m.proxy): m for m in measure(live, settings)} if live else {}
            for s in step:
                for kind in s.proxies:
                    if (s.id, kind) in done:
                        on_result(done[(s.id, kind)])
                    else:
                        b = broken[(s.setup, kind)]
                        on_result(
                            Measurement(
                                s.id,
                                s.group,
                                s.title,
                                kind,
                                s.load.describe(),
                                b.status,
                                note=b.note,
                            )
                        )
    finally:
        for proxy in running.values():
            if proxy.proc:
                sup.stop(proxy.proc)


def _start_setup(
    setup: Setup,
    steps: list[list[Scenario]],
    settings: Settings,
    sup: Supervisor,
    backends: Backends,
    running: dict[tuple[Setup, str], RunningProxy],
    broken: dict[tuple[Setup, str], Measurement],
    configs: dict[str, str],
) -> None:
    """Start the proxies of one setup (those its scenarios are measured on)."""
    shadows, compare, record, http2, grpc, primary = setup
    members = [s for step in steps for s in step if s.setup == setup]
    kinds = [k for k in PROXIES_ALL if any(k in s.proxies for s in members)]
    for kind in kinds:
        try:
            running[(setup, kind)] = start_proxy(
                sup,
                settings.work,
                kind,
                backends,
                shadows,
                compare,
                record,
                http2,
                grpc,
                primary,
            )
        except StartError as exc:
            text = str(exc)
            na = compare and "compare" in text.lower()
            status = "n/a" if na else "failed"
            why = "config key `compare` rejected" if na else "proxy did not start"
            broken[(setup, kind)] = Measurement(
                "", "", "", kind, "", status, note=f"{why}: " + _one_line(text)
            )
            continue
        name = f"{kind} shadows={'+'.join(shadows) or '-'}{' compare' if compare else ''}"
        name += f" record={record}" if record else ""
        name += " grpc" if grpc else " http2" if http2 else ""
        configs[name] = running[(setup, kind)].config


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines)[-limit:]
