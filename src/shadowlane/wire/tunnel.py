"""Upgrades: an upgrade request's handshake with the backend, then a two-way byte tunnel.

An upgrade request (`Connection: upgrade`, `Upgrade: websocket`) is forwarded by a `Handshake`
on a connection of its own to one endpoint: never one from the pool, and never back into it,
since after a `101` the connection speaks another protocol for as long as it lives. The answer's
head decides:

* `101 Switching Protocols`: the head goes to the client as the backend wrote it (Connection and
  Upgrade kept), the client connection is taken over from the HTTP/1.1 server
  (`Connection.take_over`), and the two connections become one `Tunnel`. Bytes that came after
  either head (a WebSocket server's first frame in the same segment as its `101`) are carried
  first.
* anything else: an ordinary answer, relayed to the client as any response (its framing redone
  by the exchange), after which both connections close, as the client's bytes after an upgrade
  request are not HTTP/1.1 any more.

A tunnel copies bytes both ways with back-pressure both ways: when one side's transport is over
its write high-water mark (`pause_writing`), the other side stops being read until it drains
(`resume_writing`), so a slow reader costs at most the transports' buffers, never a queue. A
half-close is passed on (`write_eof`) where the other side can take one (TCP, not TLS); one side
closing closes the other once its buffered bytes are out. A tunnel with no byte either way for
its idle timeout is closed, and `TunnelSet.drain` closes those still open at a drain's deadline.

Nothing here knows routes, shadows or metrics: the layer above hears of each step through
`HandshakeHooks`. This module is interpreted (not in setup.py's COMPILED): it runs per upgraded
connection and per chunk a tunnel carries, not per request, and it subclasses nothing compiled.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Final, cast

import httptools

from shadowlane.wire.exchange import Exchange
from shadowlane.wire.headers import response_fields, serialize_headers
from shadowlane.wire.messages import Headers
from shadowlane.wire.upstream import EndpointPool, UpstreamError, connect

__all__ = [
    "CloseReason",
    "Handshake",
    "HandshakeHooks",
    "HandshakePhase",
    "Tunnel",
    "TunnelSet",
    "offered_protocols",
]

#: headers of a `101` not passed on: framing and the hop-by-hop ones that are not the switch
_NOT_IN_101: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"keep-alive", b"proxy-connection", b"te"}
)


def offered_protocols(value: bytes) -> list[str]:
    """`Upgrade: websocket, foo/2` -> ["websocket", "foo"]: the protocol names (versions
    dropped), lower-cased, as a route's `upgrades` lists them."""
    out = []
    for item in value.split(b","):
        name = item.strip().partition(b"/")[0].strip().lower()
        if name:
            out.append(name.decode("latin-1"))
    return out


class CloseReason:
    """Why a tunnel ended (the `reason` label of `shadowlane_tunnels_closed_total`)."""

    CLIENT: Final = "client"
    BACKEND: Final = "backend"
    IDLE: Final = "idle"
    DRAIN: Final = "drain"
    RELOAD: Final = "reload"
    ERROR: Final = "error"


class HandshakeHooks:
    """What the layer above hears of one upgrade request, each at most once, in this order:
    `failed` (no answer), or `declined` then `answered` (a non-101 answer relayed), or
    `tunnelled` then `tunnel_closed`; `client_gone` when the client left before any of the
    endings. A base class with empty methods: a hook may ignore what it does not count."""

    def failed(self, err: UpstreamError) -> None:
        """No answer from the backend: the client has not been answered yet (the hook does)."""

    def declined(self, status: int) -> None:
        """The backend answered `status`, not 101; its answer is being relayed."""

    def answered(self, complete: bool) -> None:
        """The relayed answer ended (`complete`), or was cut (the client connection reset)."""

    def tunnelled(self, tunnel: Tunnel) -> None:
        """The `101` went to the client; the tunnel runs."""

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        """Both connections of the tunnel are closed; its counts are final."""

    def client_gone(self) -> None:
        """The client left before the backend's answer head."""


class HandshakePhase:
    """CONNECTING: the backend connection is being opened. WAITING: the request is written,
    no answer head yet. RELAYING: a non-101 answer streams to the client. TUNNELLED: handed
    over to a `Tunnel`. DONE: over (answered, failed, or the client left)."""

    CONNECTING: Final = 0
    WAITING: Final = 1
    RELAYING: Final = 2
    TUNNELLED: Final = 3
    DONE: Final = 4


class Handshake(asyncio.Protocol):
    """One upgrade request to one endpoint, until its answer's head says what follows."""

    def __init__(
        self,
        exchange: Exchange,
        endpoint: EndpointPool,
        head: bytes,
        timeout: float,
        idle_timeout: float,
        hooks: HandshakeHooks,
    ) -> None:
        self.exchange = exchange
        self.endpoint = endpoint
        self.head = head
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.hooks = hooks
        self.loop = asyncio.get_running_loop()
        self.phase = HandshakePhase.CONNECTING
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._status = 0
        self._reason = b""
        self._headers: Headers = []
        self._until_close = False
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0
        exchange.on_abort = self._client_gone
        exchange.on_writable = self._client_writable

    async def run(self) -> None:
        """Connect and send the request; every ending reaches the hooks."""
        try:
            await connect(self.loop, lambda: self, self.endpoint)
        except UpstreamError as err:
            self._fail(err)

    # ----- asyncio callbacks -----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.phase != HandshakePhase.CONNECTING:
            self.transport.close()  # the client left while we connected
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # a tunnel carries small interactive messages: no Nagle delay on them
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.phase = HandshakePhase.WAITING
        self._last = self.loop.time()
        self._timer = self.loop.call_later(self.timeout, self._on_timer)
        self.transport.write(self.head)

    def data_received(self, data: bytes) -> None:
        self._last = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._status == 101 and self.phase == HandshakePhase.WAITING:
                self._switch(data[int(exc.args[0]) if exc.args else len(data) :])
            else:
                self._broken("an upgrade the request did not ask for")
        except httptools.HttpParserError as exc:
            self._broken(str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        phase = self.phase
        if phase == HandshakePhase.WAITING:
            self._fail(UpstreamError("reset", "connection closed before the answer"))
        elif phase == HandshakePhase.RELAYING:
            self.phase = HandshakePhase.DONE
            if self._until_close and exc is None:
                self.exchange.end_response()  # a body delimited by the close
                self.hooks.answered(True)
            else:
                self.exchange.abort()  # never pass a cut answer off as complete
                self.hooks.answered(False)

    # ----- httptools callbacks -----
    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101:
            self._status = 101
            return
        if status < 200:
            self._headers = []  # an interim answer (100 Continue): the real one follows
            self._reason = b""
            return
        if self.phase != HandshakePhase.WAITING:
            return
        self._status = status
        self.phase = HandshakePhase.RELAYING
        content_length: int | None = None
        chunked = False
        for name, value in self._headers:
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        self._until_close = status not in (204, 304) and not chunked and content_length is None
        fields = response_fields(self._headers)
        reason = self._reason or b"OK"
        self.exchange.start_response_fields(status, reason, fields, content_length, close=True)
        self.hooks.declined(status)

    def on_body(self, body: bytes) -> None:
        if self.phase == HandshakePhase.RELAYING:
            self.exchange.send_body(body)

    def on_message_complete(self) -> None:
        if self.phase != HandshakePhase.RELAYING:
            return  # a 101's end: the switch follows from feed_data
        self.phase = HandshakePhase.DONE
        self._cancel_timer()
        self.exchange.end_response()
        if self.transport is not None:
            self.transport.close()
        self.hooks.answered(True)

    # ----- endings -----
    def _switch(self, rest: bytes) -> None:
        """The backend switched: answer the client with its `101` and join the two."""
        self._cancel_timer()
        upstream = self.transport
        taken = self.exchange.conn.take_over()
        if taken is None or upstream is None:
            self.phase = HandshakePhase.DONE
            if upstream is not None:
                upstream.close()
            return
        self.phase = HandshakePhase.TUNNELLED
        client, early = taken
        ex = self.exchange
        ex.response_started = ex.response_done = True
        ex.status = 101
        ex.on_abort = ex.on_writable = None
        head = b"HTTP/1.1 101 %s\r\n%s\r\n" % (
            self._reason or b"Switching Protocols",
            serialize_headers(h for h in self._headers if h[0] not in _NOT_IN_101),
        )
        tunnel = Tunnel(client, upstream, self.idle_timeout, self.hooks)
        tunnel.start(head, rest, early)
        self.hooks.tunnelled(tunnel)

    def _fail(self, err: UpstreamError) -> None:
        if self.phase == HandshakePhase.DONE or self.phase == HandshakePhase.TUNNELLED:
            return
        self.phase = HandshakePhase.DONE
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()
        self.hooks.failed(err)

    def _broken(self, detail: str) -> None:
        """The answer could not be parsed: 502 before its head, a cut answer after."""
        if self.phase == HandshakePhase.RELAYING:
            self.phase = HandshakePhase.DONE
            self._cancel_timer()
            if self.transport is not None:
                self.transport.close()
            self.exchange.abort()
            self.hooks.answered(False)
            return
        self._fail(UpstreamError("protocol", detail))

    def _client_gone(self) -> None:
        phase = self.phase
        if phase == HandshakePhase.DONE or phase == HandshakePhase.TUNNELLED:
            return
        self.phase = HandshakePhase.DONE
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()
        if phase == HandshakePhase.RELAYING:
            self.hooks.answered(False)
        else:
            self.hooks.client_gone()

    def _client_writable(self, writable: bool) -> None:
        """A relayed answer's back-pressure: the client's buffer is full (or drained)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if writable:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _on_timer(self) -> None:
        self._timer = None
        if self.phase != HandshakePhase.WAITING and self.phase != HandshakePhase.RELAYING:
            return
        idle = self.loop.time() - self._last
        if idle < self.timeout:
            self._timer = self.loop.call_later(self.timeout - idle, self._on_timer)
            return
        if self.phase == HandshakePhase.RELAYING:
            self._broken("timed out")
        else:
            self._fail(UpstreamError("timeout", f"no answer in {self.timeout:g}s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Side(asyncio.Protocol):
    """One connection of a tunnel: what it reads goes to the other side's transport."""

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport, closed_first: str) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: _Side
        #: bytes read from this side (and written to the other)
        self.received = 0
        self.eof = False
        self.lost = False
        #: the close reason when this side ends the tunnel
        self.closed_first = closed_first
        self._peer_write: Callable[[bytes], object] = transport.write  # set in `join`

    def join(self, peer: _Side) -> None:
        self.peer = peer
        self._peer_write = peer.transport.write

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.tunnel.last = self.tunnel.loop.time()
        if not self.peer.lost:
            self._peer_write(data)

    def eof_received(self) -> bool | None:
        return self.tunnel._eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel._lost(self, exc)

    # our transport's buffer is over its high-water mark: stop reading what fills it
    def pause_writing(self) -> None:
        peer = self.peer.transport
        if not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport
        if not peer.is_closing():
            peer.resume_reading()


class Tunnel:
    """Two connections joined after a `101`: a client's and a backend's."""

    def __init__(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        idle_timeout: float,
        hooks: HandshakeHooks,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = _Side(self, client, CloseReason.CLIENT)
        self.upstream = _Side(self, upstream, CloseReason.BACKEND)
        self.client.join(self.upstream)
        self.upstream.join(self.client)
        self.idle_timeout = idle_timeout
        #: who hears of its end (the handshake's hooks)
        self.hooks = hooks
        self.started = self.loop.time()
        self.last = self.started
        self.ended = 0.0
        #: why it ended ("" while it runs)
        self.reason = ""
        self._timer: asyncio.TimerHandle | None = None
        self._finished = False

    @property
    def bytes_up(self) -> int:
        """Client -> backend bytes (after the upgrade request's head)."""
        return self.client.received

    @property
    def bytes_down(self) -> int:
        """Backend -> client bytes (after the `101` head)."""
        return self.upstream.received

    @property
    def seconds(self) -> float:
        return (self.ended or self.loop.time()) - self.started

    def start(self, head: bytes, rest: bytes, early: bytes) -> None:
        """Write the `101` (and what followed it) to the client and the client's early bytes
        to the backend, then read both. The protocols are swapped first, so a buffer that goes
        over its mark on these writes already pauses the right side."""
        client, upstream = self.client.transport, self.upstream.transport
        client.set_protocol(self.client)
        upstream.set_protocol(self.upstream)
        self.upstream.received += len(rest)
        self.client.received += len(early)
        # the server paused reading at the upgrade request; from here on only the backend's
        # buffer (`pause_writing` below) decides
        client.resume_reading()
        client.write(head + rest)
        if early:
            upstream.write(early)
        self._timer = self.loop.call_later(self.idle_timeout, self._on_timer)

    def close(self, reason: str) -> None:
        """End it now (idle, drain, reload): both connections are aborted, not flushed, so
        a peer that reads nothing cannot hold the close."""
        if self._finished:
            return
        if not self.reason:
            self.reason = reason
        for side in (self.client, self.upstream):
            if not side.lost:
                side.transport.abort()

    # ----- the sides' callbacks -----
    def _eof(self, side: _Side) -> bool:
        side.eof = True
        peer = side.peer
        if not self.reason and not peer.eof:
            self.reason = side.closed_first
        if peer.eof or peer.lost:
            peer.transport.close()
            return False
        if peer.transport.can_write_eof() and side.transport.can_write_eof():
            peer.transport.write_eof()  # half-close passed on; the other way still runs
            return True
        peer.transport.close()
        return False

    def _lost(self, side: _Side, exc: Exception | None) -> None:
        side.lost = True
        if not self.reason:
            self.reason = CloseReason.ERROR if exc is not None else side.closed_first
        peer = side.peer
        if not peer.lost:
            peer.transport.close()  # what it still buffers goes out first
            return
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.ended = self.loop.time()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.hooks.tunnel_closed(self)

    def _on_timer(self) -> None:
        self._timer = None
        if self._finished:
            return
        idle = self.loop.time() - self.last
        if idle >= self.idle_timeout:
            self.close(CloseReason.IDLE)
            return
        self._timer = self.loop.call_later(self.idle_timeout - idle, self._on_timer)


class TunnelSet:
    """The open tunnels of one process (an instance's: they outlive generations)."""

    def __init__(self) -> None:
        self.tunnels: set[Tunnel] = set()

    def __len__(self) -> int:
        return len(self.tunnels)

    def add(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)

    def discard(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)

    def close_all(self, reason: str) -> None:
        for tunnel in list(self.tunnels):
            tunnel.close(reason)

    async def drain(self, deadline: float, *, settle: float = 1.0) -> None:
        """Let the tunnels run until `deadline` (a loop time), then close what is left, and
        wait (at most `settle` seconds) for their ends to be counted."""
        loop = asyncio.get_running_loop()
        while self.tunnels and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        self.close_all(CloseReason.DRAIN)
        end = loop.time() + settle
        while self.tunnels and loop.time() < end:
            await asyncio.sleep(0.01)
