"""The dispatcher: the proxy's only entry into shadowing, and it never blocks the proxy.

Per request the proxy calls, synchronously and cheaply:
  `begin(call)`          at dispatch: loop check, shadow `match`, sampling (decided once);
  `request_done(call)`   when the body is read: `send: with_request` copies are submitted;
  `response_done(call)`  when the primary answered: `after_response` (and ordered) copies.
Each copy is built once per lane from the shared body bytes and submitted to the lane, which
starts, queues or drops it (counted) without waiting.

Ordered lanes always send after the primary answered, because their order is defined as the
order in which the primary answers completed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from shadowlane.compare.model import CompareJob
from shadowlane.config import BackendConfig, Config, ShadowConfig
from shadowlane.routing import Route, compile_match
from shadowlane.shadow.join import EMPTY, EXAMPLE_REQUEST_BODY, CompareSlot, PrimaryCapture, Submit
from shadowlane.shadow.lane import ShadowCopy, ShadowLane
from shadowlane.shadow.mutation import MARKER, CopyBuilder
from shadowlane.shadow.outcomes import (
    COMPARISON_DROPPED,
    DROPPED,
    SAMPLED_OUT,
    SENT,
    SKIPPED_BODY,
    SKIPPED_LOOP,
    SKIPPED_STATUS,
    Outcome,
)
from shadowlane.shadow.sampling import KeyFn, Sampler, key_function
from shadowlane.wire.messages import Headers
from shadowlane.wire.upstream import BackendPool

if TYPE_CHECKING:
    from shadowlane.metrics import Metrics
    from shadowlane.proxy import ProxyCall


class LanePlan:
    """One shadow of a route: how to choose, build and send its copies."""

    __slots__ = (
        "after_response",
        "builder",
        "capture_limit",
        "cfg",
        "compare_settings",
        "compares",
        "lane",
        "match",
        "order_key",
        "sampler",
        "secondary",
    )

    def __init__(
        self,
        cfg: ShadowConfig,
        lane: ShadowLane,
        builder: CopyBuilder,
        secondary: ShadowLane | None = None,
        compare_settings: object = None,
    ) -> None:
        self.cfg = cfg
        self.lane = lane
        self.builder = builder
        #: with noise cancellation: the lane to the secondary (same version as the primary)
        self.secondary = secondary
        self.compares = lane.capture_limit > 0
        self.capture_limit = lane.capture_limit
        self.compare_settings = compare_settings
        self.sampler = Sampler(cfg.percent, _key(cfg.sample_key))
        self.match = compile_match(cfg.match) if cfg.match is not None else None
        self.order_key: KeyFn | None = _key(cfg.order_key)
        self.after_response = cfg.send == "after_response" or self.order_key is not None


class RouteShadows:
    """All shadows of one route."""

    __slots__ = ("lanes", "max_body", "route")

    def __init__(self, route: str, lanes: list[LanePlan]) -> None:
        self.route = route
        self.lanes = lanes
        self.max_body = max(p.cfg.max_body for p in lanes)


class RequestShadows:
    """Per-request state: the lanes this request was sampled into, and what became of it."""

    __slots__ = ("outcomes", "requested", "sampled", "waiting_body")

    def __init__(self, sampled: list[LanePlan]) -> None:
        self.sampled = sampled
        self.outcomes: dict[str, str] = {}
        #: the `with_request` copies have been decided (sent, dropped or skipped)
        self.requested = False
        #: `with_request` copies waiting for the rest of a body the primary answered early
        self.waiting_body: list[LanePlan] = []


def _key(spec: tuple[str, str] | None) -> KeyFn | None:
    return key_function(*spec) if spec is not None else None


BuildPool = Callable[[str, BackendConfig], BackendPool]
CompileSettings = Callable[[ShadowConfig, Route], object]


class ShadowDispatcher:
    def __init__(
        self,
        metrics: Metrics,
        cfg: Config,
        build_pool: BuildPool,
        compare_submit: Submit | None = None,
        compile_settings: CompileSettings | None = None,
    ) -> None:
        self.metrics = metrics
        self.cfg = cfg
        self._build_pool = build_pool
        self._compare_submit = compare_submit
        self._compile_settings = compile_settings
        self.lanes: list[ShadowLane] = []
        self.plans: dict[str, RouteShadows] = {}
        metrics.set_gauge_provider(
            "shadowlane_shadow_in_flight",
            "Shadow copies being sent now, per route and target.",
            ("route", "target"),
            lambda: [((ln.route, ln.target), float(len(ln.in_flight))) for ln in self.lanes],
        )
        metrics.set_gauge_provider(
            "shadowlane_shadow_circuit_open",
            "1 while a shadow target's circuit is open (its copies are shed), else 0.",
            ("route", "target"),
            lambda: [((ln.route, ln.target), float(ln.circuit_open())) for ln in self.lanes],
        )
        metrics.set_gauge_provider(
            "shadowlane_shadow_queued",
            "Shadow copies waiting for an in-flight slot or their key's turn.",
            ("route", "target"),
            lambda: [((ln.route, ln.target), float(ln.waiting_count)) for ln in self.lanes],
        )

    @property
    def active(self) -> bool:
        return bool(self.plans)

    def plan(self, route: Route) -> RouteShadows | None:
        """Build the lanes of a route (each with its own pool); None when it has no shadows."""
        if not route.config.shadows:
            return None
        plans = []
        for sc in route.config.shadows:
            opts = sc.compare_enabled if self._compare_submit is not None else None
            capture = opts.max_body if opts is not None else 0
            lane = self._lane(route, sc, sc.backend, capture)
            secondary = None
            if opts is not None and opts.secondary:
                secondary = self._lane(route, sc, opts.secondary, capture)
            settings = None
            if opts is not None and self._compile_settings is not None:
                settings = self._compile_settings(sc, route)
            builder = CopyBuilder(sc, route.name)
            plans.append(LanePlan(sc, lane, builder, secondary, settings))
        shadows = RouteShadows(route.name, plans)
        self.plans[route.name] = shadows
        return shadows

    def _lane(self, route: Route, sc: ShadowConfig, backend: str, capture: int) -> ShadowLane:
        lane = ShadowLane(
            route.name,
            backend,
            # each lane gets its own pool (its own connection limit), never the primary's
            self._build_pool(backend, self.cfg.backends[backend]),
            self.metrics,
            timeout=sc.timeout,
            max_in_flight=sc.max_in_flight,
            queue=sc.queue,
            ordered=sc.ordered_by is not None,
            capture_limit=capture,
        )
        self.lanes.append(lane)
        self.metrics.declare_shadow(route.name, backend)
        return lane

    # ----- the three calls from the proxy -----
    def begin(self, call: ProxyCall) -> RequestShadows | None:
        shadows = call.rt.shadows
        if shadows is None:
            return None
        req = call.request
        metrics = self.metrics
        for name, _ in req.headers:
            if name == MARKER:
                # loop detection: a copy (ours or another instance's) is never copied again
                for p in shadows.lanes:
                    metrics.shadow_outcome(shadows.route, p.lane.target, SKIPPED_LOOP)
                return None
        sampled: list[LanePlan] = []
        capture = 0
        for p in shadows.lanes:
            if p.match is not None and not p.match(req):
                continue
            # paused counts as percent 0: the request was not sampled (the percent is kept)
            if not p.lane.paused and p.sampler.sampled(req):
                sampled.append(p)
                if p.capture_limit > capture:
                    capture = p.capture_limit
            else:
                metrics.shadow_outcome(shadows.route, p.lane.target, SAMPLED_OUT)
        if capture:
            call.capture = PrimaryCapture(capture)
        return RequestShadows(sampled) if sampled else None

    def request_done(self, call: ProxyCall) -> None:
        """The request body is complete (or there is none): `with_request` copies go now,
        whatever becomes of the primary."""
        state = call.shadow_state
        assert isinstance(state, RequestShadows)
        if state.requested:
            return
        state.requested = True
        base = call.upstream_headers
        assert base is not None  # kept by the proxy for routes with shadows
        for p in state.sampled:
            if not p.after_response:
                self._submit(call, p, state, base)

    def response_done(self, call: ProxyCall) -> None:
        """The primary answered, failed, or the client left: `after_response` copies go now.
        `with_request` copies not decided yet wait for the rest of the body when the primary
        answered early and it is still being read (`late_body`); otherwise they are skipped."""
        state = call.shadow_state
        assert isinstance(state, RequestShadows)
        base = call.upstream_headers
        assert base is not None
        status = call.status
        requested = state.requested
        state.requested = True
        for p in state.sampled:
            if not p.after_response:
                if not requested:
                    if call.body is not None:
                        self._submit(call, p, state, base)
                    elif call.body_may_follow():
                        state.waiting_body.append(p)  # see late_body
                    else:
                        self._outcome(state, p, SKIPPED_BODY)
                continue
            if status == 499 or (p.cfg.only_if_primary == "2xx" and not 200 <= status < 300):
                # 499: the client left and the primary exchange was abandoned mid-way
                self._outcome(state, p, SKIPPED_STATUS)
                continue
            if call.body is None:
                self._outcome(state, p, SKIPPED_BODY)
                continue
            self._submit(call, p, state, base)

    def late_body(self, call: ProxyCall) -> None:
        """The body of a request the primary answered early is complete (or lost for good):
        the `with_request` copies that waited for it go now, or are `skipped_body`."""
        state = call.shadow_state
        assert isinstance(state, RequestShadows)
        waiting, state.waiting_body = state.waiting_body, []
        base = call.upstream_headers
        assert base is not None
        for p in waiting:
            if call.body is not None:
                self._submit(call, p, state, base)
            else:
                self._outcome(state, p, SKIPPED_BODY)

    def _submit(self, call: ProxyCall, p: LanePlan, state: RequestShadows, base: Headers) -> None:
        body = call.body
        if body is None or len(body) > p.cfg.max_body:
            self._outcome(state, p, SKIPPED_BODY)
            return
        req = call.request
        key = p.order_key(req) if p.order_key is not None else None
        if p.lane.circuit_open():
            p.lane.fail_open()
            state.outcomes[p.lane.target] = DROPPED
            if p.compares:
                self.metrics.comparison(p.lane.route, p.lane.target, COMPARISON_DROPPED)
            return
        if p.lane.full(key, len(body)):
            p.lane.drop()
            state.outcomes[p.lane.target] = DROPPED
            if p.compares:
                self.metrics.comparison(p.lane.route, p.lane.target, COMPARISON_DROPPED)
            return
        endpoint = p.lane.pool.pick()
        head = p.builder.head(req, base, len(body), endpoint.authority)
        slot = self._slot(call, p, body) if p.compares else None
        on_done = slot.on_candidate if slot else None
        copy = ShadowCopy(p.lane, req.method, head, body, key, on_done, endpoint)
        if p.lane.submit(copy):
            state.outcomes[p.lane.target] = SENT
        else:
            state.outcomes[p.lane.target] = DROPPED
            if slot is not None:
                slot.copy_dropped()
            return
        if slot is not None and p.secondary is not None:
            sep = p.secondary.pool.pick()
            shead = (
                head
                if not p.builder.host_is_endpoint
                else p.builder.head(req, base, len(body), sep.authority)
            )
            second = ShadowCopy(p.secondary, req.method, shead, body, key, slot.on_secondary, sep)
            if not p.secondary.submit(second):
                slot.copy_dropped()

    def _slot(self, call: ProxyCall, p: LanePlan, body: bytes) -> CompareSlot | None:
        capture = call.capture
        if capture is None or self._compare_submit is None:
            return None
        req = call.request
        job = CompareJob(
            route=p.lane.route,
            target=p.lane.target,
            request_id=req.request_id,
            method=req.method,
            uri=req.target.decode("latin-1"),
            request_body=body[:EXAMPLE_REQUEST_BODY],
            primary=EMPTY,
            candidate=EMPTY,
            secondary=None,
            settings=p.compare_settings,
        )
        slot = CompareSlot(job, p.secondary is not None, self._compare_submit, self.metrics)
        capture.attach(slot)
        return slot

    def _outcome(self, state: RequestShadows, p: LanePlan, outcome: Outcome) -> None:
        state.outcomes[p.lane.target] = outcome
        self.metrics.shadow_outcome(p.lane.route, p.lane.target, outcome)

    def outcomes(self, call: ProxyCall) -> dict[str, str] | None:
        """The shadow decision per target, for the access log line."""
        state = call.shadow_state
        return state.outcomes if isinstance(state, RequestShadows) else None

    async def drain(self, seconds: float) -> None:
        if not self.lanes:
            return
        deadline = self.lanes[0].loop.time() + seconds
        for lane in self.lanes:
            await lane.drain(deadline)
