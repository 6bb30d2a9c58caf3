"""HTTP/2 test peers built on the `h2` library: a recording backend, and a blocking client.

`H2Backend` is a real HTTP/2 server on 127.0.0.1 port 0 (h2c with prior knowledge, or h2 over
TLS when given an `ssl.SSLContext`), on its own asyncio loop thread. It records every request
(head, body, trailers) and answers with what its handler returns (`H2Reply`: status, headers,
body, trailers, a delay before answering), streams concurrently, honours flow control.

`H2Client` is a blocking client for one connection (a plain or TLS socket): `request()` opens
a stream, `exchange()` runs many streams at once and returns each answer, with the time each
one completed, so a test can tell that a slow stream did not hold up the others.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

from .servers import ServerThread

Headers = list[tuple[bytes, bytes]]


@dataclass
class H2Request:
    stream_id: int
    headers: Headers
    body: bytes = b""
    trailers: Headers = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def method(self) -> bytes:
        return self.header(b":method") or b""

    @property
    def path(self) -> bytes:
        return self.header(b":path") or b""


@dataclass
class H2Reply:
    status: int = 200
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    trailers: Headers | None = None
    #: seconds to wait before answering (the loop keeps serving other streams)
    delay: float = 0.0


def echo(req: H2Request) -> H2Reply:
    """Answers with the path and the body it got (and the body's size in a header)."""
    body = req.path + b"\n" + req.body
    return H2Reply(200, [(b"content-type", b"text/plain"), (b"x-got", b"%d" % len(req.body))], body)


class _Conn(asyncio.Protocol):
    def __init__(self, backend: H2Backend) -> None:
        self.backend = backend
        # `checked=False`: a misbehaving backend, which sends whatever headers it is given
        checked = backend.checked
        self.h2 = H2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_outbound_headers=checked,
                normalize_outbound_headers=checked,
            )
        )
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, H2Request] = {}
        self.bodies: dict[int, bytearray] = {}
        self.pending: dict[int, bytearray] = {}
        self.ends: dict[int, Headers | None] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.initiate_connection()
        self._flush()
        with self.backend.cond:
            self.backend.connections += 1

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except Exception:
            assert self.transport is not None
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, RequestReceived):
                self.requests[ev.stream_id] = H2Request(ev.stream_id, list(ev.headers or []))
            elif isinstance(ev, DataReceived):
                if ev.stream_id in self.requests:
                    # one buffer per stream: `bytes +=` copies the body so far on every frame
                    self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data or b"")
                if self.backend.acknowledge:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
            elif isinstance(ev, TrailersReceived):
                req = self.requests.get(ev.stream_id)
                if req is not None:
                    req.trailers = list(ev.headers or [])
            elif isinstance(ev, StreamEnded):
                req = self.requests.pop(ev.stream_id, None)
                body = self.bodies.pop(ev.stream_id, None)
                if req is not None:
                    req.body = bytes(body or b"")
                    self._answer(req)
            elif isinstance(ev, StreamReset):
                self.requests.pop(ev.stream_id, None)
                self.bodies.pop(ev.stream_id, None)
                self.pending.pop(ev.stream_id, None)
            elif isinstance(ev, WindowUpdated):
                for sid in list(self.pending):
                    self._pump(sid)
            elif isinstance(ev, ConnectionTerminated):
                assert self.transport is not None
                self.transport.close()
        self._flush()

    def _answer(self, req: H2Request) -> None:
        backend = self.backend
        with backend.cond:
            backend.requests.append(req)
            backend.cond.notify_all()
        reply = backend.handler(req)
        loop = asyncio.get_running_loop()
        if reply.delay:
            loop.call_later(reply.delay, self._send, req.stream_id, reply)
        else:
            self._send(req.stream_id, reply)

    def _send(self, sid: int, reply: H2Reply) -> None:
        try:
            head = [(b":status", b"%d" % reply.status), *reply.headers]
            no_body = not reply.body and reply.trailers is None
            self.h2.send_headers(sid, head, end_stream=no_body)
            if not no_body:
                self.pending[sid] = bytearray(reply.body)
                self.ends[sid] = reply.trailers
                self._pump(sid)
        except Exception:
            pass  # the stream went away (reset by the proxy)
        self._flush()

    def _pump(self, sid: int) -> None:
        out = self.pending[sid]
        try:
            while out:
                room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                if room <= 0:
                    return
                chunk = bytes(out[:room])
                del out[:room]
                self.h2.send_data(sid, chunk)
            trailers = self.ends.pop(sid, None)
            if trailers is not None:
                self.h2.send_headers(sid, trailers, end_stream=True)
            else:
                self.h2.end_stream(sid)
        except Exception:
            pass
        self.pending.pop(sid, None)
        self._flush()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)


class H2Backend(ServerThread):
    """An HTTP/2 server on 127.0.0.1:0 that records requests; TLS (ALPN h2) with `ssl`."""

    def __init__(
        self,
        handler: Callable[[H2Request], H2Reply] = echo,
        ssl: ssl.SSLContext | None = None,
        *,
        checked: bool = True,
        acknowledge: bool = True,
    ) -> None:
        super().__init__()
        self.handler = handler
        #: False: never give back flow-control window, so a peer stalls after 64 KiB per
        #: stream (a backend that stops reading, as HTTP/2 sees it)
        self.acknowledge = acknowledge
        self.ssl = ssl
        self.checked = checked
        if ssl is not None:
            self.scheme = "https"
        self.cond = threading.Condition()
        self.requests: list[H2Request] = []
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[H2Request]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.requests)} request(s), wanted {n}")
                self.cond.wait(left)
            return list(self.requests)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await self._loop.create_server(lambda: _Conn(self), self.host, 0, ssl=self.ssl)
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()

    def _wake(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)


@dataclass
class H2Answer:
    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    trailers: Headers = field(default_factory=list)
    reset: int | None = None
    #: seconds from sending to the end of this answer
    seconds: float = 0.0

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class H2Client:
    """One HTTP/2 connection from the test thread (blocking, bounded by `timeout`)."""

    def __init__(
        self, host: str, port: int, *, tls: ssl.SSLContext | None = None, timeout: float = 10.0
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
            assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
        self.sock = sock
        self.timeout = timeout
        self.authority = f"{host}:{port}".encode()
        # a test client may send what a careful one would not (malformed requests)
        self.h2 = H2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.h2.initiate_connection()
        self.goaway: int | None = None
        self.remote_settings_seen = False
        self._send()

    def _send(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def exchange(self, requests: list[tuple[bytes, bytes, Headers, bytes]]) -> list[H2Answer]:
        """Send every (method, path, headers, body) at once on its own stream; wait for all
        the answers (or resets); return them in request order."""
        t0 = time.monotonic()
        answers: dict[int, H2Answer] = {}
        order: list[int] = []
        bodies: dict[int, bytearray] = {}
        for method, path, headers, body in requests:
            sid = self.h2.get_next_available_stream_id()
            # a request that names its Host goes without :authority (RFC 9113 8.3.1 allows it)
            authority = (
                [] if any(n == b"host" for n, _ in headers) else [(b":authority", self.authority)]
            )
            head = [
                (b":method", method),
                (b":scheme", b"http"),
                *authority,
                (b":path", path),
                *headers,
            ]
            self.h2.send_headers(sid, head, end_stream=not body)
            answers[sid] = H2Answer()
            order.append(sid)
            if body:
                bodies[sid] = bytearray(body)
        self._pump(bodies)
        self._send()
        open_ = set(order)
        deadline = t0 + self.timeout
        while open_:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed with {len(open_)} stream(s) unanswered")
            for ev in self.h2.receive_data(data):
                sid = getattr(ev, "stream_id", 0)
                ans = answers.get(sid)
                if isinstance(ev, ResponseReceived) and ans is not None:
                    for n, v in ev.headers or []:
                        if n == b":status":
                            ans.status = int(v)
                        else:
                            ans.headers.append((n, v))
                elif isinstance(ev, DataReceived) and ans is not None:
                    ans.body += ev.data or b""
                    self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
                elif isinstance(ev, TrailersReceived) and ans is not None:
                    ans.trailers = list(ev.headers or [])
                elif isinstance(ev, StreamEnded) and ans is not None:
                    ans.seconds = time.monotonic() - t0
                    open_.discard(sid)
                elif isinstance(ev, StreamReset) and ans is not None:
                    ans.reset = int(ev.error_code or 0)
                    ans.seconds = time.monotonic() - t0
                    open_.discard(sid)
                    bodies.pop(sid, None)
                elif isinstance(ev, WindowUpdated):
                    self._pump(bodies)
                elif isinstance(ev, ConnectionTerminated):
                    self.goaway = ev.last_stream_id
                    if ev.last_stream_id is not None:
                        for s in list(open_):
                            if s > ev.last_stream_id:
                                answers[s].reset = -1
                                open_.discard(s)
            self._send()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(open_)} stream(s) unanswered after {self.timeout}s")
        return [answers[s] for s in order]

    def _pump(self, bodies: dict[int, bytearray]) -> None:
        for sid in list(bodies):
            out = bodies[sid]
            while out:
                room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = bytes(out[:room])
                del out[:room]
                self.h2.send_data(sid, chunk, end_stream=not out)
            if not out:
                del bodies[sid]

    def request(
        self, method: bytes, path: bytes, headers: Headers | None = None, body: bytes = b""
    ) -> H2Answer:
        return self.exchange([(method, path, headers or [], body)])[0]

    def wait_goaway(self, timeout: float = 10.0) -> int | None:
        """Read until the server's GOAWAY (its last stream id) or the connection's end."""
        deadline = time.monotonic() + timeout
        while self.goaway is None and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                break
            for ev in self.h2.receive_data(data):
                if isinstance(ev, ConnectionTerminated):
                    self.goaway = ev.last_stream_id
        return self.goaway

    def close(self) -> None:
        try:
            self.h2.close_connection()
            self._send()
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
