"""A generation: the backends, routes and shadow lanes one config builds, as one value.

Why one object: a reload must never serve new routes with old backends, or old lanes with a new
route table. Everything a config needs is built first; only then is the generation swapped in,
by one assignment, so a reload that fails half-way leaves nothing half-applied. A request in
flight keeps the route runtime, pool and lanes it started with; those of a replaced generation
are retired, not torn down: idle connections close at once, busy ones when released, lanes get a
few seconds to finish their copies.

What outlives generations (the listener and its TLS context, the metrics, the comparator and
its store, the access log, runtime control) is the instance's, not the generation's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from shadowlane.compare.settings import compile_settings
from shadowlane.config import BackendConfig, Config, ShadowConfig
from shadowlane.metrics import Metrics
from shadowlane.proxy import Proxy, RouteRuntime
from shadowlane.routing import RouteTable
from shadowlane.shadow.dispatcher import ShadowDispatcher
from shadowlane.shadow.join import Submit
from shadowlane.store import Divergence
from shadowlane.wire.upstream import BackendPool, EndpointPool

__all__ = [
    "RETIRE_SHADOW_SECONDS",
    "Generation",
    "build_backend",
    "build_generation",
    "keeps_ledger",
]

#: seconds a replaced generation's lanes get to finish their copies
RETIRE_SHADOW_SECONDS = 5.0


def build_backend(name: str, cfg: BackendConfig) -> BackendPool:
    """A backend's pool, one endpoint pool per URL. Shadow lanes call it too: each lane gets
    its own pool, so a slow shadow cannot take the primary's connections."""
    endpoints = []
    for ep in cfg.endpoints:
        ctx: ssl.SSLContext | None = None
        if ep.scheme == "https":
            ctx = ssl.create_default_context(cafile=cfg.ca_file)
            if not cfg.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        endpoints.append(
            EndpointPool(
                ep.host,
                ep.port,
                connect_timeout=cfg.connect_timeout,
                max_connections=cfg.max_connections,
                max_idle=cfg.max_idle,
                ssl_context=ctx,
                server_hostname=ep.host if ctx else None,
            )
        )
    return BackendPool(name, endpoints, cfg.timeout)


def keeps_ledger(sc: ShadowConfig) -> bool:
    """Copies of this shadow can diverge in a way the divergence ledger records: they are
    ordered writes, or rewritten with ids from the primary's answer."""
    return sc.ordering is not None or sc.ids_from_primary is not None


@dataclass(frozen=True, slots=True)
class Generation:
    """The serving objects of one config; never changed once built, only replaced."""

    cfg: Config
    backends: dict[str, BackendPool]
    routes: RouteTable
    shadow: ShadowDispatcher
    runtimes: dict[str, RouteRuntime]

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


def build_generation(
    cfg: Config,
    metrics: Metrics,
    compare_submit: Submit | None,
    *,
    record_divergence: Callable[[Divergence], bool] | None = None,
) -> Generation:
    """Build every pool, route and lane `cfg` describes. `compare_submit` is the comparator's
    queue, None while no shadow compares (lanes then capture nothing); `record_divergence`
    its divergence ledger queue, None while the instance has no store."""
    backends = {name: build_backend(name, b) for name, b in cfg.backends.items()}
    routes = RouteTable(cfg.routes)
    compare_cfg = cfg.compare
    shadow = ShadowDispatcher(
        metrics,
        cfg,
        build_pool=build_backend,
        compare_submit=compare_submit,
        compile_settings=lambda sc, route: compile_settings(sc, route.config, compare_cfg),
        record_divergence=record_divergence,
    )
    for rc in cfg.routes:
        for sc in rc.shadows:
            if keeps_ledger(sc):
                # every reason's series at zero from the start, so rate() and alerts on
                # `shadowlane_divergences_total` see the first divergence
                metrics.declare_ordered(rc.name, sc.backend)
    runtimes = {}
    for route in routes.routes:
        max_body = route.config.max_body
        if max_body is None:
            max_body = cfg.limits.max_body
        runtimes[route.name] = RouteRuntime(route, max_body, shadow.plan(route))
    return Generation(cfg, backends, routes, shadow, runtimes)
