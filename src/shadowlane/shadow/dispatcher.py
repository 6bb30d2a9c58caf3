"""The dispatcher: the proxy's only entry into shadowing, and it never blocks the proxy.

It builds each route's lanes once per (re)load (`plan`), and per request decides, once and
cheaply, whether the request is shadowed at all (`begin`: loop check, each shadow's `match`,
sampling). What follows for that request is the ticket's (shadow/ticket.py), which the proxy
holds and calls at its moments; the dispatcher keeps no per-request state.

Ordered lanes always send after the primary answered, because their order is defined as the
order in which the primary answers completed. Their ordering scopes (shadow/ordering.py) are
the dispatcher's too: one per (scope name, target), shared by the lanes of every route that
names it, so a generation's routes order their copies together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from shadowlane.config import BackendConfig, Config, ShadowConfig
from shadowlane.record.recorder import Recorder
from shadowlane.routing import Route
from shadowlane.shadow.join import PrimaryCapture, Room, Submit
from shadowlane.shadow.lane import ShadowCopy, ShadowLane
from shadowlane.shadow.mutation import MARKER, CopyBuilder
from shadowlane.shadow.offload import write_worker
from shadowlane.shadow.ordering import OrderScope
from shadowlane.shadow.outcomes import (
    DROPPED,
    SAMPLED_OUT,
    SENT,
    SHED,
    SKIPPED_LOOP,
    SKIPPED_PRIMARY,
    SKIPPED_UPGRADE,
    Outcome,
)
from shadowlane.shadow.plan import LanePlan, RouteShadows
from shadowlane.shadow.ticket import ShadowTicket
from shadowlane.shadow.writes import ANSWER_LIMIT, Record, WritePlan
from shadowlane.wire.messages import EMPTY_BODY, Headers, Request
from shadowlane.wire.upstream import BackendPool

if TYPE_CHECKING:
    from shadowlane.metrics import Metrics

__all__ = ["LanePlan", "RouteShadows", "ShadowDispatcher", "ShadowTicket"]

BuildPool = Callable[[str, BackendConfig], BackendPool]
CompileSettings = Callable[[ShadowConfig, Route], object]
#: the recorder of a shadow with `record:` (the app's: it owns the writer thread)
BuildRecorder = Callable[[Route, ShadowConfig], Recorder]


class ShadowDispatcher:
    def __init__(
        self,
        metrics: Metrics,
        cfg: Config,
        build_pool: BuildPool,
        compare_submit: Submit | None = None,
        compile_settings: CompileSettings | None = None,
        *,
        compare_room: Room | None = None,
        record_divergence: Record | None = None,
        build_recorder: BuildRecorder | None = None,
    ) -> None:
        self.metrics = metrics
        self._build_recorder = build_recorder
        #: (scope name, target) -> the scope its lanes order their copies in
        self.scopes: dict[tuple[str, str], OrderScope] = {}
        self.cfg = cfg
        #: the divergence ledger's recorder (`Comparator.record_divergence`): non-blocking,
        #: False when the entry was dropped; None when the instance keeps no store
        self.record_divergence = record_divergence
        self._build_pool = build_pool
        self._compare_submit = compare_submit
        #: asked once per compared request, before anything is captured (join.Room)
        self._compare_room = compare_room
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
        for index, sc in enumerate(route.config.shadows):
            opts = sc.compare_enabled if self._compare_submit is not None else None
            capture = opts.max_body if opts is not None else 0
            writes = self._writes(route, index, sc)
            if writes is not None and writes.needs_answer:
                capture = max(capture, ANSWER_LIMIT)  # the target's answer is checked too
            scope = None
            if writes is not None and sc.ordering is not None:
                key = (writes.scope, sc.backend)
                scope = self.scopes.get(key)
                if scope is None:
                    scope = self.scopes[key] = OrderScope(writes.scope, sc.backend)
            lane = self._lane(route, sc, sc.backend, capture, scope)
            secondary = None
            if opts is not None and opts.secondary:
                # the secondary answers reads for noise: its copies are not ordered
                secondary = self._lane(route, sc, opts.secondary, opts.max_body)
            settings = None
            if opts is not None and self._compile_settings is not None:
                settings = self._compile_settings(sc, route)
            builder = CopyBuilder(sc, route.name)
            recorder = None
            if sc.record is not None and self._build_recorder is not None:
                recorder = self._build_recorder(route, sc)
            plan = LanePlan(
                sc, lane, builder, secondary, settings, writes, opts is not None, recorder
            )
            if recorder is not None and recorder.answers:
                # the shadow's answers are kept up to the recording's cap; set after the plan,
                # whose capture_limit says how much of the *primary's* answer is needed
                lane.capture_limit = max(lane.capture_limit, recorder.max_body)
                plan.copy_capture_uncompared = max(plan.copy_capture_uncompared, recorder.max_body)
            plans.append(plan)
        shadows = RouteShadows(route.name, plans)
        self.plans[route.name] = shadows
        return shadows

    def _writes(self, route: Route, index: int, sc: ShadowConfig) -> WritePlan | None:
        """The write steps of an ordered or id-rewriting shadow; its scope's name is the one
        configured, or one of its own (`ordered_by`, `order` without a scope)."""
        if not sc.keeps_ledger:
            return None
        order = sc.ordering
        name = order.scope if order is not None and order.scope else f"{route.name}#{index}"
        plan = WritePlan(sc, route.name, name, self.metrics, self.record_divergence)
        if plan.es:  # its big `_bulk` copies are built and checked off the loop
            plan.worker = write_worker()
        return plan

    def _lane(
        self,
        route: Route,
        sc: ShadowConfig,
        backend: str,
        capture: int,
        scope: OrderScope | None = None,
    ) -> ShadowLane:
        lane = ShadowLane(
            route.name,
            backend,
            # each lane gets its own pool (its own connection limit), never the primary's
            self._build_pool(backend, self.cfg.backends[backend]),
            self.metrics,
            timeout=sc.timeout,
            max_in_flight=sc.max_in_flight,
            queue=sc.queue,
            capture_limit=capture,
            scope=scope,
        )
        self.lanes.append(lane)
        self.metrics.declare_shadow(route.name, backend)
        return lane

    # ----- per request -----
    def begin(
        self,
        shadows: RouteShadows,
        request: Request,
        headers: Headers,
        forwarded: Request,
        primary: str = "",
    ) -> ShadowTicket | None:
        """Decide which of the route's shadows get a copy of `request`: a ticket for the
        proxy to carry, or None when none does. The shadows' `match` and sampling read the
        client's `request`, as the route's match does; the copies start from `forwarded`
        (`request` itself, or the route's rewrite of it) sent to the primary backend named
        `primary` with `headers`. A shadow whose backend is that primary gets no copy
        (`skipped_primary`): during a weighted split or a migration's flip, the requests the
        new backend answers itself must not be copied to it again."""
        metrics = self.metrics
        for name, _ in request.headers:
            if name == MARKER:
                # loop detection: a copy (ours or another instance's) is never copied again
                for p in shadows.lanes:
                    metrics.shadow_outcome(shadows.route, p.lane.target, SKIPPED_LOOP)
                return None
        sampled: list[LanePlan] = []
        capture = 0
        uncompared = 0  # the capture needed if the comparison is not admitted
        compares = False
        for p in shadows.lanes:
            if p.match is not None and not p.match(request):
                continue
            if p.lane.target == primary:
                metrics.shadow_outcome(shadows.route, primary, SKIPPED_PRIMARY)
                continue
            # paused counts as percent 0: the request was not sampled (the percent is kept)
            if not p.lane.paused and p.sampler.sampled(request):
                sampled.append(p)
                if p.capture_limit > capture:
                    capture = p.capture_limit
                if p.compares:
                    compares = True
                    if p.capture_uncompared > uncompared:
                        uncompared = p.capture_uncompared
                elif p.capture_limit > uncompared:
                    uncompared = p.capture_limit
            else:
                metrics.shadow_outcome(shadows.route, p.lane.target, SAMPLED_OUT)
        if not sampled:
            return None
        admitted = True
        if compares and self._compare_room is not None and not self._compare_room():
            admitted = False  # counted `dropped` per compared copy, by the ticket
            capture = uncompared
        return ShadowTicket(
            forwarded,
            headers,
            sampled,
            PrimaryCapture(capture) if capture else None,
            metrics,
            self._compare_submit,
            admitted,
            shadows.stream_at,
        )

    def shed(self, shadows: RouteShadows) -> None:
        """The overload manager sheds shadow work: no copy of this request, each target
        counts it `shed` (nothing is sampled, built or queued)."""
        metrics = self.metrics
        for p in shadows.lanes:
            metrics.shadow_outcome(shadows.route, p.lane.target, SHED)

    def begin_upgrade(
        self, shadows: RouteShadows, request: Request, headers: Headers, forwarded: Request
    ) -> dict[str, str]:
        """An upgrade request (WebSocket) the route tunnels: a tunnel is never shadowed (its
        bytes after the `101` have no request/answer shape to copy or compare), so each shadow
        counts it `skipped_upgrade`, except one with `upgrades: handshake`, which is sent the
        handshake alone (`headers` keep Connection and Upgrade), sampled like any copy; its
        `101` ends the copy and the connection. Returns target -> outcome for the access log.
        Never waits, as `begin` (and reads `request` and `forwarded` as it does)."""
        metrics = self.metrics
        route = shadows.route
        looped = any(name == MARKER for name, _ in request.headers)
        outcomes: dict[str, str] = {}
        for p in shadows.lanes:
            lane = p.lane
            outcome: Outcome
            if looped:
                outcome = SKIPPED_LOOP
            elif p.cfg.upgrades != "handshake":
                outcome = SKIPPED_UPGRADE
            elif p.match is not None and not p.match(request):
                continue
            elif lane.paused or not p.sampler.sampled(request):
                outcome = SAMPLED_OUT
            elif lane.breaker.is_open():
                lane.fail_open()  # counted there
                outcomes[lane.target] = DROPPED
                continue
            else:
                endpoint = lane.pool.pick()
                head = p.builder.head(forwarded, headers, 0, endpoint.authority)
                copy = ShadowCopy(lane, request.method, head, EMPTY_BODY, None, endpoint)
                # the lane counts `sent`, and `dropped` when it cannot take the copy
                outcomes[lane.target] = SENT if lane.submit(copy) else DROPPED
                continue
            metrics.shadow_outcome(route, lane.target, outcome)
            outcomes[lane.target] = outcome
        return outcomes

    async def drain(self, seconds: float) -> None:
        if not self.lanes:
            return
        deadline = self.lanes[0].loop.time() + seconds
        for lane in self.lanes:
            await lane.drain(deadline)
