"""Upgrade requests (WebSocket) on the primary path: which route tunnels which protocol, the
shadows' share of them, and what is counted and logged.

The proxy hands over an exchange whose `upgrade` is set (`Proxy.on_upgrade`, one test per
request); `Upgrades.handle` decides, by the route's `upgrades` list, whether it is tunnelled
or served as a plain request (False: the proxy forwards it with Upgrade stripped, and the
connection closes after the answer). A tunnelled one is an `UpgradeCall`: it builds the
backend request (Connection and Upgrade kept, X-Forwarded-* and the request id as for any
request), gives the shadows their part (`ShadowDispatcher.begin_upgrade`: never the tunnel;
the handshake alone to a shadow with `upgrades: handshake`), and runs a `wire.tunnel.Handshake`,
whose hooks it implements: the metrics (`shadowlane_upgrades_total`, the tunnel counters), the
requests counter (the handshake's status: 101, or the backend's other answer), the access log
(one line when a tunnel closes, with its bytes each way and its duration) and the instance's
`TunnelSet` (drain, reload).

It sits beside the proxy (it imports it, the proxy imports nothing of it) and stays
interpreted: it runs once per upgrade request, not per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shadowlane.metrics import Metrics
from shadowlane.proxy import Proxy, RouteRuntime, gateway_status
from shadowlane.wire.exchange import Exchange
from shadowlane.wire.headers import new_request_id, serialize_headers, upstream_request_headers
from shadowlane.wire.messages import Request
from shadowlane.wire.tunnel import (
    CloseReason,
    Handshake,
    HandshakeHooks,
    Tunnel,
    TunnelSet,
    offered_protocols,
)
from shadowlane.wire.upstream import BackendPool, UpstreamError

__all__ = ["TunnelLog", "UpgradeCall", "Upgrades"]

#: the access log line of a tunnel that closed: (request, route, backend, seconds, shadows,
#: bytes client -> backend, bytes backend -> client, close reason)
TunnelLog = Callable[[Request, str, str, float, "dict[str, str] | None", int, int, str], None]

#: an upgrade request's hooks keep a tunnel's route (and backend, endpoint) for a reload
KeepTunnel = Callable[["UpgradeCall"], bool]


class Upgrades:
    """The proxy's `on_upgrade`, and the tunnels it opened."""

    def __init__(
        self,
        proxy: Proxy,
        metrics: Metrics,
        tunnels: TunnelSet,
        tunnel_log: TunnelLog | None = None,
    ) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.tunnels = tunnels
        self.tunnel_log = tunnel_log
        self.loop = asyncio.get_running_loop()

    def allows(self, rt: RouteRuntime, value: bytes) -> bool:
        """Every protocol the client offers is one the route tunnels (so the backend cannot
        pick one the route does not allow)."""
        offered = offered_protocols(value)
        allowed = rt.route.config.upgrades
        return bool(offered) and all(p in allowed for p in offered)

    def handle(self, exchange: Exchange, rt: RouteRuntime, backend: BackendPool, t0: float) -> bool:
        if not self.allows(rt, exchange.upgrade):
            self.metrics.upgrade(rt.name, "not_allowed")
            return False
        UpgradeCall(self, exchange, rt, backend, t0).start()
        return True

    def gauge(self) -> list[tuple[tuple[str], float]]:
        """`shadowlane_tunnels_active{route}`: open tunnels per route, at scrape time."""
        counts: dict[str, int] = {}
        for tunnel in self.tunnels.tunnels:
            hooks = tunnel.hooks
            if isinstance(hooks, UpgradeCall):
                counts[hooks.route] = counts.get(hooks.route, 0) + 1
        return [((route,), float(n)) for route, n in counts.items()]

    def retire(self, keep: KeepTunnel, grace: float) -> int:
        """After a reload: the tunnels `keep` refuses (their route, backend or endpoint is
        gone, or the route no longer allows their protocol) are closed after `grace` seconds;
        the others go on. Returns how many will close."""
        doomed = [
            t
            for t in self.tunnels.tunnels
            if isinstance(t.hooks, UpgradeCall) and not keep(t.hooks)
        ]
        if doomed:

            def close() -> None:
                for tunnel in doomed:
                    tunnel.close(CloseReason.RELOAD)

            self.loop.call_later(grace, close)
        return len(doomed)


class UpgradeCall(HandshakeHooks):
    """One upgrade request the route tunnels: the handshake, then (after a `101`) its tunnel."""

    def __init__(
        self, owner: Upgrades, exchange: Exchange, rt: RouteRuntime, backend: BackendPool, t0: float
    ) -> None:
        self.owner = owner
        self.exchange = exchange
        self.request = exchange.request
        self.rt = rt
        self.route = rt.name
        self.backend = backend
        self.endpoint = backend.pick()
        #: the protocol names asked for (for a reload's check)
        self.protocols = offered_protocols(exchange.upgrade)
        self.t0 = t0
        self.status = 0
        #: target -> outcome of each shadow, for the access log
        self.shadows: dict[str, str] | None = None
        self.tunnel: Tunnel | None = None

    def start(self) -> None:
        owner = self.owner
        proxy = owner.proxy
        req = self.request
        headers, rid = upstream_request_headers(
            req.headers, req.client_addr.encode(), proxy.proto, self.endpoint.authority
        )
        req.request_id = rid.decode("latin-1")
        # the switch itself is hop-by-hop: asked of the backend as the client asked it of us
        upgrade = next((v for k, v in req.headers if k == b"upgrade"), self.exchange.upgrade)
        headers.append((b"connection", b"upgrade"))
        headers.append((b"upgrade", upgrade))
        shadow, shadows = proxy.shadow, self.rt.shadows
        if shadow is not None and shadows is not None:
            self.shadows = shadow.begin_upgrade(shadows, req, headers) or None
        head = b"%s %s HTTP/1.1\r\n%s\r\n" % (
            req.method.encode(),
            req.target,
            serialize_headers(headers),
        )
        handshake = Handshake(
            self.exchange,
            self.endpoint,
            head,
            self.backend.timeout,
            self.rt.route.config.tunnel_idle_timeout,
            self,
        )
        owner.loop.create_task(handshake.run())

    # ----- HandshakeHooks -----
    def failed(self, err: UpstreamError) -> None:
        status = gateway_status(err.kind)
        msg = f"upstream {self.backend.name} ({self.endpoint.label}): {err}\n"
        self.exchange.respond(status, msg.encode(), close=True)
        self.owner.metrics.upgrade(self.route, "failed")
        self._answered(status)

    def declined(self, status: int) -> None:
        self.status = status

    def answered(self, complete: bool) -> None:
        self.owner.metrics.upgrade(self.route, "declined")
        self._answered(self.status)

    def client_gone(self) -> None:
        self.owner.metrics.upgrade(self.route, "failed")
        self._answered(499)

    def tunnelled(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.status = 101
        owner = self.owner
        owner.tunnels.add(tunnel)
        owner.metrics.upgrade(self.route, "tunnelled")
        # the handshake is the request: counted with its status and how long it took
        owner.metrics.observe_request(
            self.route, self.backend.name, 101, owner.loop.time() - self.t0
        )

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        owner = self.owner
        owner.tunnels.discard(tunnel)
        reason = tunnel.reason or CloseReason.ERROR
        owner.metrics.tunnel_closed(self.route, reason, tunnel.bytes_up, tunnel.bytes_down)
        if owner.tunnel_log is not None:
            owner.tunnel_log(
                self.request,
                self.route,
                self.backend.name,
                owner.loop.time() - self.t0,
                self.shadows,
                tunnel.bytes_up,
                tunnel.bytes_down,
                reason,
            )

    def _answered(self, status: int) -> None:
        """A handshake that did not become a tunnel: counted and logged as a request."""
        owner = self.owner
        elapsed = owner.loop.time() - self.t0
        owner.metrics.observe_request(self.route, self.backend.name, status, elapsed)
        log = owner.proxy.access_log
        if log is not None:
            if not self.request.request_id:
                self.request.request_id = new_request_id().decode()
            log(self.request, self.route, self.backend.name, status, elapsed, self.shadows)
