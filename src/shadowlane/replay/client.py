"""Sending replayed requests: the upstream pool of wire/, sized for the replay, with deadlines.

The connection layers are the ones the proxy and the shadows use (`wire.upstream`: endpoint
pools of keep-alive connections, an httptools response parser, named connection states), so a
replay talks to a backend exactly as live shadowing does. What is the replay's own:

- **Bounds.** One pool per target (the `--to` target, the live primary, the secondary), each
  with at most `--concurrency` connections; the runner never has more requests in flight.
- **A deadline per request** (`--timeout`), from the first byte sent to the last byte read,
  connecting included; past it the connection is dropped and the request counts as a timeout.
- **Retries, only where safe.** A reused keep-alive connection that the server had closed
  (no byte of an answer came back) is retried once on a new connection for idempotent
  methods, as a shadow copy is. A non-idempotent request (POST, PATCH) is never retried, and
  so that a stale connection never makes it fail either, it is not sent on a connection that
  sat idle longer than `STALE_IDLE` (servers' shortest keep-alive timeouts are about 5 s).
- **Answers captured** up to a limit for comparison (the comparison's `max_body`, or more
  when a write's answer is checked item by item).
"""

from __future__ import annotations

import asyncio

from shadowlane.compare import Captured
from shadowlane.config import BackendConfig
from shadowlane.routing import build_backend
from shadowlane.wire.messages import Headers
from shadowlane.wire.upstream import (
    IDEMPOTENT,
    BackendPool,
    EndpointPool,
    ResponseSink,
    UpstreamConnection,
    UpstreamError,
)

#: a non-idempotent request never goes on a connection idle for longer than this
STALE_IDLE = 2.0


def build_pool(name: str, cfg: BackendConfig, connections: int) -> BackendPool:
    """A pool for one replay target, as the proxy builds one (`routing.build_backend`), with
    at most `connections` connections to each endpoint."""
    return build_backend(name, cfg, connections)


class Answer:
    """How one replayed request ended: the answer as captured, and why it failed if it did."""

    __slots__ = ("captured", "detail", "sent")

    def __init__(self, captured: Captured, detail: str = "", sent: bool = True) -> None:
        self.captured = captured
        #: for a failure: what went wrong (`refused: Connection refused`, `no answer in 5s`)
        self.detail = detail
        #: the request went out (a failure to connect sent nothing)
        self.sent = sent

    @property
    def failure(self) -> str:
        return self.captured.failure


class _Call(ResponseSink):
    """One request on one connection: the sink of its answer, and its deadline."""

    __slots__ = (
        "_chunks",
        "_size",
        "conn",
        "fut",
        "headers",
        "limit",
        "retryable",
        "status",
    )

    def __init__(self, fut: asyncio.Future[str], limit: int) -> None:
        self.fut = fut
        self.limit = limit
        self.conn: UpstreamConnection | None = None
        self.status = 0
        self.headers: Headers = []
        self._chunks: list[bytes] = []
        self._size = 0
        self.retryable = False

    def on_response_head(
        self, status: int, reason: bytes, headers: Headers, content_length: int | None
    ) -> None:
        self.status = status
        self.headers = headers

    def on_response_body(self, data: bytes) -> None:
        room = self.limit - self._size
        if room > 0:
            self._chunks.append(data if len(data) <= room else data[:room])
        self._size += len(data)

    def on_response_end(self) -> None:
        if not self.fut.done():
            self.fut.set_result("")

    def on_upstream_error(self, err: UpstreamError, retryable: bool) -> None:
        self.retryable = retryable
        if not self.fut.done():
            self.fut.set_result(f"{err.kind}: {err.detail}" if err.detail else err.kind)

    def body(self) -> tuple[bytes, bool]:
        return b"".join(self._chunks), self._size > self.limit


class Target:
    """Where replayed requests go: a name (for the summary and the store) and its pool."""

    def __init__(
        self, role: str, name: str, label: str, pool: BackendPool, timeout: float, limit: int
    ) -> None:
        #: `to`, `primary` or `secondary`
        self.role = role
        #: the backend name comparisons are stored under
        self.name = name
        #: what the user named (a URL or a backend), for messages
        self.label = label
        self.pool = pool
        self.timeout = timeout
        #: bytes of each answer kept for comparison
        self.limit = limit
        self.loop = asyncio.get_running_loop()

    def pick(self) -> EndpointPool:
        """The endpoint the next request goes to (its Host may name it)."""
        return self.pool.pick()

    async def check(self) -> str:
        """What failed when some endpoint refuses connections (checked before a replay), or
        "" when all accept."""
        for ep in self.pool.endpoints:
            try:
                conn = await ep.connect()
            except UpstreamError as err:
                return f"{ep.label}: {err.detail or err.kind}"
            conn.close()
        return ""

    async def send(self, ep: EndpointPool, method: str, head: bytes, body: bytes) -> Answer:
        """Send one request (head and body) to `ep`; never raises for the target's failures."""
        loop = self.loop
        t0 = loop.time()
        deadline = t0 + self.timeout
        retried = False
        while True:
            conn = ep.get_idle()
            stale = conn is not None and loop.time() - conn.idle_since > STALE_IDLE
            if conn is not None and stale and method not in IDEMPOTENT:
                conn.close()
                conn = None
            if conn is None:
                try:
                    conn = await asyncio.wait_for(
                        ep.connect() if retried else ep.acquire(),
                        max(0.0, deadline - loop.time()),
                    )
                except TimeoutError:
                    return self._failed("timeout", "no connection in time", t0, sent=False)
                except UpstreamError as err:
                    kind = "timeout" if err.kind == "timeout" else "error"
                    return self._failed(kind, str(err), t0, sent=False)
            fut: asyncio.Future[str] = loop.create_future()
            call = _Call(fut, self.limit)
            call.conn = conn
            conn.send_request(head, call, self.timeout, head_request=method == "HEAD")
            if body:
                conn.write_body(body)
            conn.end_request()
            try:
                error = await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except TimeoutError:
                conn.abandon()
                return self._failed("timeout", f"no answer in {self.timeout:g}s", t0)
            if not error:
                data, cut = call.body()
                seconds = loop.time() - t0
                return Answer(Captured(call.status, call.headers, data, cut, seconds))
            if call.retryable and not retried and method in IDEMPOTENT:
                retried = True
                continue
            kind = "timeout" if error.startswith("timeout") else "error"
            return self._failed(kind, error, t0)

    def _failed(self, kind: str, detail: str, t0: float, sent: bool = True) -> Answer:
        seconds = self.loop.time() - t0
        return Answer(Captured(0, [], b"", False, seconds, kind), detail, sent)

    def close(self) -> None:
        self.pool.close()
