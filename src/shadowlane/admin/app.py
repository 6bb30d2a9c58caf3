"""The admin application: routes, token check, built-in endpoints, and server life cycle.

Other parts of shadowlane add their endpoints (config, comparisons, dashboard) with `route()`;
this module owns what every deployment needs: `/metrics`, `/healthz`, `/api/status`, uniform
JSON errors, and the rule that changing state needs `Authorization: Bearer <token>`. A bearer
header (rather than a cookie) also means a browser page on another origin cannot trigger a
mutating call without a CORS preflight, which this server never grants.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from shadowlane import __version__
from shadowlane.admin.messages import (
    AdminRequest,
    AdminResponse,
    Handler,
    error_response,
    json_response,
    text_response,
)
from shadowlane.admin.router import Found, MethodNotAllowed, Router
from shadowlane.admin.server import AdminConnection, Limits
from shadowlane.metrics import Metrics

__all__ = ["AdminApp"]

log = logging.getLogger(__name__)


class AdminApp:
    """The admin HTTP server. Start it with `start()`, stop it with `close()`.

    `token` protects mutating routes; None (or "") means none is configured and those routes
    answer 403 rather than being open. The app starts ready: `/healthz` says 200 until
    `set_ready(False)` or `close()`.
    """

    def __init__(
        self,
        metrics: Metrics,
        token: str | None = None,
        *,
        max_body: int = 1 << 20,
        max_header: int = 16 * 1024,
        idle_timeout: float = 60.0,
    ) -> None:
        self.metrics = metrics
        self._token = token.encode("utf-8") if token else None
        self._limits = Limits(max_body=max_body, max_header=max_header, idle_timeout=idle_timeout)
        self._router = Router()
        self._ready = True
        self._closing = False
        self._started_monotonic = time.monotonic()
        self._started_wall = time.time()
        self._server: asyncio.Server | None = None
        self._connections: dict[AdminConnection, asyncio.Task[None]] = {}
        #: says what is degraded while serving (a lost store); None when all is well
        self._health_detail: Callable[[], dict[str, Any] | None] | None = None

        self.route("GET", "/metrics", self._metrics)
        self.route("GET", "/healthz", self._healthz)
        self.route("GET", "/api/status", self._status)

    # -- configuration --------------------------------------------------------------------------

    def route(self, method: str, path: str, handler: Handler, *, mutating: bool = False) -> None:
        """Serve `handler` for `method` on `path`; `{name}` segments become `request.params`.

        Exact paths win over patterns; patterns are tried in the order they were added. GET
        routes also answer HEAD. `mutating=True` requires the bearer token.
        """
        self._router.add(method, path, handler, mutating=mutating)

    def set_health_detail(self, fn: Callable[[], dict[str, Any] | None]) -> None:
        """While `fn` returns a dict, a serving `/healthz` still answers 200 but as JSON,
        `{"status": "ok", "degraded": true, ...fn()}`: the instance serves, a person should
        know why not everything is well (a load balancer keeps it, a probe can read it)."""
        self._health_detail = fn

    def set_ready(self, ready: bool) -> None:
        """Say whether `/healthz` reports 200 (serving) or 503 (starting or draining)."""
        self._ready = ready

    @property
    def ready(self) -> bool:
        return self._ready and not self._closing

    # -- life cycle -----------------------------------------------------------------------------

    async def start(
        self, host: str, port: int, *, sock: socket.socket | None = None
    ) -> asyncio.base_events.Server:
        """Listen on `host:port` (port 0 picks a free one), or on an already bound `sock`."""
        if self._server is not None:
            raise RuntimeError("admin server already started")
        if sock is not None:
            server = await asyncio.start_server(self._on_client, sock=sock)
        else:
            server = await asyncio.start_server(self._on_client, host, port, reuse_address=True)
        self._server = server
        return server

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening, close idle connections, give in-flight requests `grace` seconds."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._connections):
            conn.close_if_idle()
        pending = set(self._connections.values())
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for conn, task in list(self._connections.items()):
                if task in still:
                    conn.abort()
            if still:
                await asyncio.wait(still, timeout=1.0)
        if server is not None:
            await server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = AdminConnection(reader, writer, self.handle, self._limits, self._is_closing)
        self._connections[conn] = task
        try:
            await conn.run()
        finally:
            del self._connections[conn]

    def _is_closing(self) -> bool:
        return self._closing

    # -- dispatch -------------------------------------------------------------------------------

    async def handle(self, request: AdminRequest) -> AdminResponse:
        """Route, authorize and run one request; handler errors become a JSON 500."""
        match = self._router.match(request.method, request.path)
        if match is None:
            return error_response(404, "not found", path=request.path)
        if isinstance(match, MethodNotAllowed):
            return error_response(
                405,
                "method not allowed",
                headers=(("allow", ", ".join(match.allowed)),),
                allowed=list(match.allowed),
            )
        assert isinstance(match, Found)
        if match.mutating:
            denied = self._authorize(request)
            if denied is not None:
                return denied
        request.params = match.params
        try:
            response = await match.handler(request)
        except Exception:
            log.exception("admin handler failed: %s %s", request.method, request.path)
            return error_response(500, "internal error")
        if not isinstance(response, AdminResponse):
            log.error("admin handler for %s %s returned %r", request.method, request.path, response)
            return error_response(500, "internal error")
        return response

    def _authorize(self, request: AdminRequest) -> AdminResponse | None:
        if self._token is None:
            return error_response(403, "admin token not configured")
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        # The header was decoded as latin-1, so encoding back gives the bytes that were sent.
        given = credentials.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._token):
            return error_response(
                401, "missing or wrong admin token", headers=(("www-authenticate", "Bearer"),)
            )
        return None

    # -- built-in routes ------------------------------------------------------------------------

    async def _metrics(self, request: AdminRequest) -> AdminResponse:
        # Rendered on the loop on purpose: gauge providers read loop-owned state without locks.
        body, content_type = self.metrics.render()
        return AdminResponse(body=body, content_type=content_type)

    async def _healthz(self, request: AdminRequest) -> AdminResponse:
        if self.ready:
            detail = self._health_detail() if self._health_detail is not None else None
            if detail is not None:
                return json_response({"status": "ok", "degraded": True, **detail})
            return text_response("ok\n")
        return text_response("draining\n" if self._closing else "not ready\n", status=503)

    async def _status(self, request: AdminRequest) -> AdminResponse:
        return json_response(
            {
                "version": __version__,
                "pid": os.getpid(),
                "uptime_seconds": round(time.monotonic() - self._started_monotonic, 3),
                "started_at": self._started_wall,
                "ready": self.ready,
            }
        )
