"""A generation: the backends, routes and shadow lanes one config builds, as one value.

Why one object: a reload must never serve new routes with old backends, or old lanes with a new
route table. Everything a config needs is built first; only then is the generation swapped in,
by one assignment, so a reload that fails half-way leaves nothing half-applied. A request in
flight keeps the route runtime, pool and lanes it started with; those of a replaced generation
are retired, not torn down: idle connections close at once, busy ones when released, lanes get a
few seconds to finish their copies.

What outlives generations (the listener and its TLS context, the metrics, the comparator and
its store, the record writer thread, the access log, runtime control) is the instance's, not
the generation's. The recorders are the generation's: a reload builds new ones (new files, the
new rules) and the writer closes the old ones' files once their last requests are in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from shadowlane.compare.redact import Redaction
from shadowlane.compare.settings import compile_settings
from shadowlane.config import Config, RecordConfig, ShadowConfig
from shadowlane.metrics import Metrics
from shadowlane.proxy import Proxy, RouteRuntime
from shadowlane.record import RecordWriter, build_redaction
from shadowlane.record.recorder import Recorder
from shadowlane.routing import Route, RouteTable, build_backend, build_shadow_backend
from shadowlane.shadow.dispatcher import ShadowDispatcher
from shadowlane.shadow.join import Submit
from shadowlane.shadow.mutation import RequestRewrite
from shadowlane.shadow.sampling import Sampler, key_function
from shadowlane.store import Divergence
from shadowlane.wire.upstream import BackendPool

__all__ = [
    "RETIRE_SHADOW_SECONDS",
    "Generation",
    "build_backend",
    "build_generation",
]

#: seconds a replaced generation's lanes get to finish their copies
RETIRE_SHADOW_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Generation:
    """The serving objects of one config; never changed once built, only replaced."""

    cfg: Config
    backends: dict[str, BackendPool]
    routes: RouteTable
    shadow: ShadowDispatcher
    runtimes: dict[str, RouteRuntime]
    #: every recorder of this generation (routes' and shadows'), and the writer they feed
    recorders: list[Recorder] = field(default_factory=list)
    writer: RecordWriter | None = None

    @property
    def proxy_shadow(self) -> ShadowDispatcher | None:
        """The dispatcher as the proxy takes it: None while no route shadows, so a request
        on such a config costs one test instead of a call."""
        return self.shadow if self.shadow.active else None

    def serve_on(self, proxy: Proxy) -> None:
        """Make `proxy` route with this generation from its next request on.

        The proxy keeps its own references rather than one to the generation: a request then
        costs no extra lookup, and these few assignments run only at a reload.
        """
        proxy.routes = self.routes
        proxy.runtimes = self.runtimes
        proxy.backends = self.backends
        proxy.shadow = self.proxy_shadow

    def retire(self, loop: asyncio.AbstractEventLoop) -> None:
        """After a reload replaced it: the pools finish what they carry (idle connections close
        now, busy ones on release) and the lanes get a few seconds for their copies."""
        for backend in self.backends.values():
            backend.close()
        loop.create_task(self.shadow.drain(RETIRE_SHADOW_SECONDS))
        if self.writer is not None:
            self.writer.retire(self.recorders)


def records(cfg: Config) -> bool:
    """Does any route or shadow of `cfg` record (so the instance needs a writer)?"""
    return any(
        rc.record is not None or any(sc.record is not None for sc in rc.shadows)
        for rc in cfg.routes
    )


class _Recordings:
    """The recorders and redaction rules of one generation, built before its routes' plans
    (a compared shadow's stored examples get its recording's rules)."""

    def __init__(self, cfg: Config, metrics: Metrics, writer: RecordWriter | None) -> None:
        self.metrics = metrics
        self.writer = writer
        self.recorders: list[Recorder] = []
        #: (route, target) -> rules; target "" for the route's own recording
        self.redactions: dict[tuple[str, str], Redaction | None] = {}
        for rc in cfg.routes:
            own = build_redaction(rc.record) if rc.record is not None else None
            self.redactions[(rc.name, "")] = own
            for sc in rc.shadows:
                if sc.record is not None:
                    self.redactions[(rc.name, sc.backend)] = build_redaction(sc.record, own)

    def examples_redaction(self, route: str, target: str) -> Redaction | None:
        """The rules for a compared shadow's stored examples: its recording's (which include
        the route's), else the route's."""
        red = self.redactions.get((route, target))
        return red if red is not None else self.redactions.get((route, ""))

    def build(self, route: str, target: str, rcfg: RecordConfig) -> Recorder:
        assert self.writer is not None  # the instance makes one for any config that records
        sampled = None
        if rcfg.percent < 100.0:
            spec = rcfg.sample_key
            sampled = Sampler(rcfg.percent, key_function(*spec) if spec else None).sampled
        rec = Recorder(
            route,
            target,
            max_body=rcfg.max_body,
            queue_limit=rcfg.queue,
            answers=rcfg.answers,
            metrics=self.metrics,
            sampled=sampled,
        )
        self.metrics.declare_record(route, target)
        self.writer.add(rec, rcfg, self.redactions.get((route, target)))
        self.recorders.append(rec)
        return rec

    def for_shadow(self, route: Route, sc: ShadowConfig) -> Recorder:
        assert sc.record is not None
        return self.build(route.name, sc.backend, sc.record)


def build_generation(
    cfg: Config,
    metrics: Metrics,
    compare_submit: Submit | None,
    writer: RecordWriter | None = None,
    *,
    record_divergence: Callable[[Divergence], bool] | None = None,
    compare_room: Callable[[], bool] | None = None,
) -> Generation:
    """Build every pool, route, lane and recorder `cfg` describes. `compare_submit` is the
    comparator's queue, None while no shadow compares (lanes then capture nothing); `writer`
    the record writer, needed when anything records (see `records`); `record_divergence` the
    divergence ledger's queue, None while the instance has no store; `compare_room` whether
    the comparator has room for a job begun now (`Comparator.has_room`)."""
    backends = {name: build_backend(name, b) for name, b in cfg.backends.items()}
    routes = RouteTable(cfg.routes)
    compare_cfg = cfg.compare
    rec = _Recordings(cfg, metrics, writer)
    shadow = ShadowDispatcher(
        metrics,
        cfg,
        build_pool=build_shadow_backend,
        compare_submit=compare_submit,
        compare_room=compare_room,
        compile_settings=lambda sc, route: compile_settings(
            sc, route.config, compare_cfg, rec.examples_redaction(route.name, sc.backend)
        ),
        record_divergence=record_divergence,
        build_recorder=rec.for_shadow,
    )
    for rc in cfg.routes:
        for sc in rc.shadows:
            if sc.keeps_ledger:
                # every reason's series at zero from the start, so rate() and alerts on
                # `shadowlane_divergences_total` see the first divergence
                metrics.declare_ordered(rc.name, sc.backend)
    runtimes = {}
    try:
        for route in routes.routes:
            if route.config.upgrades:
                metrics.declare_upgrades(route.name)
            max_body = route.config.max_body
            if max_body is None:
                max_body = cfg.limits.max_body
            rcfg = route.config.record
            recorder = rec.build(route.name, "", rcfg) if rcfg is not None else None
            rewrite = RequestRewrite(route.config) if route.config.rewrites else None
            runtimes[route.name] = RouteRuntime(
                route, max_body, shadow.plan(route), recorder, rewrite
            )
    except BaseException:
        if writer is not None:  # a half-built generation never serves: its files go now
            writer.retire(rec.recorders, at_once=True)
        raise
    return Generation(cfg, backends, routes, shadow, runtimes, rec.recorders, writer)
