"""Real HTTP/1.1 test backends that record what reached them.

Why not reuse shadowlane's own wire code: a test backend built on the code under test would
agree with its bugs. These servers parse with ``h11`` (an independent, strict implementation)
and run on their own thread and their own asyncio loop, so a proxy subprocess talks to them over
real loopback sockets exactly as it would talk to a production backend.

- :class:`RecordingBackend` answers requests (echo by default, or through a handler) and records
  every request exactly as received, plus byte and connection counters that let a test prove a
  request did *not* reach it.
- :class:`HungServer` accepts connections and never reads: the "backend is stuck" case.
- :func:`dead_port` gives a port that refuses connections: the "backend is down" case.
- :class:`FullBacklog` is a port whose SYNs are dropped, so connecting hangs: the "firewalled
  host" case.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import re
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import h11

from support.procfs import established_from

from .servers import ServerThread, SocketServer

Action = Literal["reset_mid_body", "hang", "close"]

#: statuses whose responses never carry a body (RFC 9110 §6.4.1)
_NO_BODY_STATUSES = frozenset({204, 304})


def pattern_bytes(n: int) -> bytes:
    """``n`` deterministic bytes (0..255 repeating): large bodies whose corruption is visible."""
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


@dataclass(frozen=True)
class Recorded:
    """One request as the backend received it (after the proxy, if there is one in front).

    ``headers`` keep the original case, order and duplicates, because header rewriting is part
    of what the proxy is tested for. ``connection_id`` numbers the backend's accepted connections
    from 1, so a test can tell whether the proxy reused an upstream connection.
    """

    method: str
    target: str
    http_version: str
    headers: list[tuple[str, str]]
    body: bytes
    connection_id: int = 0

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        """The raw query string without ``?`` ("" when absent)."""
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """All values of header ``name`` (case-insensitive), in received order."""
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]


@dataclass
class Reply:
    """What a handler wants the backend to answer.

    ``body`` as ``bytes`` is sent with a Content-Length (unless ``headers`` set framing
    themselves); as a ``list`` it is sent chunked, one chunk per element. ``delay`` waits before
    the status line. ``action`` replaces the normal answer by a failure:

    - ``"reset_mid_body"``: status line and a Content-Length twice the body's size, the body,
      then a TCP RST (SO_LINGER 0) — a backend that dies mid-response.
    - ``"hang"``: never answer; the socket stays open until the client closes it or the backend
      stops.
    - ``"close"``: close the connection without answering.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | list[bytes] = b""
    delay: float = 0.0
    action: Action | None = None


Handler = Callable[[Recorded], Reply]


def echo_reply(req: Recorded, status: int = 200) -> Reply:
    """The default answer: the request itself as JSON, so a test can see what arrived."""
    if status in _NO_BODY_STATUSES or 100 <= status < 200:
        return Reply(status=status)
    payload = {
        "method": req.method,
        "target": req.target,
        "http_version": req.http_version,
        "headers": [[k, v] for k, v in req.headers],
        "body": req.body.decode("utf-8", "replace"),
        "body_len": len(req.body),
    }
    return Reply(
        status=status,
        headers=[("Content-Type", "application/json")],
        body=json.dumps(payload).encode(),
    )


_STATUS_RE = re.compile(r"/status/(\d{3})")
_DELAY_RE = re.compile(r"/delay/(\d+(?:\.\d+)?)")
_BYTES_RE = re.compile(r"/bytes/(\d+)")
_CHUNKED_RE = re.compile(r"/chunked/(\d+)")


def named(name: str) -> Handler:
    """A handler answering ``name`` as a text/plain body: which backend served a request, at
    a glance (canary weights, reloads that switch backends)."""
    body = name.encode()

    def handler(_req: Recorded) -> Reply:
        return Reply(headers=[("Content-Type", "text/plain")], body=body)

    return handler


def default_handler(req: Recorded) -> Reply:
    """Path conventions, so most tests need no handler of their own.

    ``/status/NNN`` echo with that status; ``/delay/SECONDS`` echo after a delay;
    ``/bytes/N`` N bytes of :func:`pattern_bytes`; ``/chunked/N`` N chunks ``chunk-<i>\\n``;
    ``/reset`` reset mid-body; ``/hang`` never answer; anything else echo.
    """
    path = req.path
    if m := _STATUS_RE.fullmatch(path):
        return echo_reply(req, int(m.group(1)))
    if m := _DELAY_RE.fullmatch(path):
        reply = echo_reply(req)
        reply.delay = float(m.group(1))
        return reply
    if m := _BYTES_RE.fullmatch(path):
        return Reply(
            headers=[("Content-Type", "application/octet-stream")],
            body=pattern_bytes(int(m.group(1))),
        )
    if m := _CHUNKED_RE.fullmatch(path):
        return Reply(
            headers=[("Content-Type", "text/plain")],
            body=[f"chunk-{i}\n".encode() for i in range(int(m.group(1)))],
        )
    if path == "/reset":
        return Reply(body=pattern_bytes(8192), action="reset_mid_body")
    if path == "/hang":
        return Reply(action="hang")
    return echo_reply(req)


class _Stats:
    """Counters shared between the server thread and the test thread, under one condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.requests: list[Recorded] = []
        self.raw_bytes = 0
        self.connections_accepted = 0
        self.open_connections = 0
        self.errors: list[Exception] = []

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout=timeout):
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class RecordingBackend(ServerThread):
    """A real HTTP/1.1 server on 127.0.0.1 (port 0) that records every request.

    Use as a context manager (or ``start()``/``stop()``, see :class:`support.servers.
    ThreadRunner`). Keep-alive, pipelining, Content-Length and chunked request bodies and
    ``Expect: 100-continue`` are handled by h11. The handler runs on the server's loop thread;
    it must not block (use ``Reply.delay`` to be slow).
    """

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_header_bytes: int = 64 * 1024,
    ) -> None:
        super().__init__(host)
        self.handler: Handler = handler or default_handler
        self._requested_port = port
        self._max_header_bytes = max_header_bytes
        self._stats = _Stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()

    # -- what tests read ----------------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        """A snapshot of the requests received so far, in arrival order."""
        with self._stats.cond:
            return list(self._stats.requests)

    @property
    def raw_bytes(self) -> int:
        """Bytes received over all connections, parsed or not."""
        with self._stats.cond:
            return self._stats.raw_bytes

    @property
    def connections_accepted(self) -> int:
        with self._stats.cond:
            return self._stats.connections_accepted

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed (by either side)."""
        with self._stats.cond:
            return self._stats.open_connections

    @property
    def errors(self) -> list[Exception]:
        """Unexpected exceptions in the server (harness bugs); the fixture asserts none."""
        with self._stats.cond:
            return list(self._stats.errors)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        """Block until at least ``n`` requests were recorded; return them all (bounded)."""
        stats = self._stats
        stats.wait_for(lambda: len(stats.requests) >= n, timeout, f"{n} request(s)")
        return self.requests

    def wait_for(self, predicate: Callable[[RecordingBackend], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate(self)`` holds; it is re-checked whenever any counter moves."""
        self._stats.wait_for(lambda: predicate(self), timeout, "backend condition")

    def clear(self) -> None:
        """Forget recorded requests (counters keep counting)."""
        with self._stats.cond:
            self._stats.requests.clear()

    # -- the server thread --------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    def _wake(self) -> None:
        """Close the listener and every connection (hung ones too): see ``_main``."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already finished
                loop.call_soon_threadsafe(stopping.set)

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._on_connection, self.host, self._requested_port)
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            tasks = list(self._conn_tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        stats = self._stats
        with stats.cond:
            stats.connections_accepted += 1
            stats.open_connections += 1
            conn_id = stats.connections_accepted
            stats.cond.notify_all()
        try:
            await self._serve(conn_id, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as e:  # a harness bug: keep it for the test to see, not for stderr
            with stats.cond:
                stats.errors.append(e)
        finally:
            writer.close()
            with stats.cond:
                stats.open_connections -= 1
                stats.cond.notify_all()
            self._conn_tasks.discard(task)

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        data = await reader.read(65536)
        if data:
            with self._stats.cond:
                self._stats.raw_bytes += len(data)
                self._stats.cond.notify_all()
        return data

    async def _serve(
        self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_header_bytes)
        head: h11.Request | None = None
        body: list[bytes] = []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = e.error_status_hint
                    msg = f"bad request: {e}\n".encode()
                    writer.write(
                        f"HTTP/1.1 {status} Bad Request\r\nContent-Length: {len(msg)}\r\n"
                        "Connection: close\r\n\r\n".encode()
                        + msg
                    )
                    await writer.drain()
                return
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                conn.receive_data(await self._read(reader))
                continue
            if isinstance(event, h11.Request):
                head, body = event, []
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                rec = Recorded(
                    method=head.method.decode("ascii"),
                    target=head.target.decode("latin-1"),
                    http_version=head.http_version.decode("ascii"),
                    headers=[
                        (k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in head.headers.raw_items()
                    ],
                    body=b"".join(body),
                    connection_id=conn_id,
                )
                with self._stats.cond:
                    self._stats.requests.append(rec)
                    self._stats.cond.notify_all()
                try:
                    reply = self.handler(rec)
                except Exception as e:  # a broken handler shows up as a 500, not a hang
                    reply = Reply(status=500, body=f"handler raised {e!r}\n".encode())
                if not await self._respond(conn, reader, writer, rec, reply):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return

    async def _sleep_unless_stopped(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; False if the backend was stopped meanwhile."""
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), delay)
        except TimeoutError:
            return True
        return False

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        """Hold the connection open, reading (and counting) anything, until EOF or stop."""
        assert self._stopping is not None
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                read = asyncio.ensure_future(self._read(reader))
                done, _ = await asyncio.wait({stop, read}, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    read.cancel()
                    return
                if not read.result():
                    return
        finally:
            stop.cancel()

    async def _respond(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rec: Recorded,
        reply: Reply,
    ) -> bool:
        """Send ``reply``; False when the connection must end here."""
        if reply.delay > 0 and not await self._sleep_unless_stopped(reply.delay):
            return False
        if reply.action == "close":
            return False
        if reply.action == "hang":
            await self._hang(reader)
            return False
        body = b"".join(reply.body) if isinstance(reply.body, list) else reply.body
        if reply.action == "reset_mid_body":
            await self._reset_mid_body(writer, reply, body)
            return False

        headers = list(reply.headers)
        names = {k.lower() for k, _ in headers}
        chunked = isinstance(reply.body, list)
        if not chunked and not names & {"content-length", "transfer-encoding"}:
            headers.append(("Content-Length", str(len(body))))
        try:
            reason = http.HTTPStatus(reply.status).phrase.encode()
        except ValueError:
            reason = b""
        writer.write(
            conn.send(h11.Response(status_code=reply.status, headers=headers, reason=reason)) or b""
        )
        sends_body = rec.method != "HEAD" and reply.status not in _NO_BODY_STATUSES
        if sends_body:
            parts = reply.body if isinstance(reply.body, list) else [body]
            for part in parts:
                if part:
                    writer.write(conn.send(h11.Data(data=part)) or b"")
                    await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        return conn.our_state is h11.DONE

    async def _reset_mid_body(
        self, writer: asyncio.StreamWriter, reply: Reply, body: bytes
    ) -> None:
        if not body:
            body = pattern_bytes(8192)
        head = f"HTTP/1.1 {reply.status} OK\r\nContent-Length: {2 * len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in reply.headers) + "\r\n"
        transport = writer.transport
        transport.set_write_buffer_limits(high=0)  # drain() then waits until the kernel has it all
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


class HungServer(SocketServer):
    """Accepts TCP connections and never reads from or answers them, until stopped.

    The "backend is stuck" case: connect succeeds, the request goes into the kernel buffer,
    nothing ever comes back. Context manager; ``.port`` (known before start), ``.url``,
    ``.connections_accepted``. Stop closes every accepted socket.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host, backlog=128)
        #: the client's port of each accepted connection (kept: getpeername fails after a RST)
        self._peer_ports: list[int] = []

    def _on_accept(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        with self._cond:  # held, never read: no thread per connection
            self._peer_ports.append(addr[1])
            self._keep(conn)

    @property
    def connections_accepted(self) -> int:
        with self._cond:
            return len(self._conns)

    def wait_for_connections(self, n: int, timeout: float = 5.0) -> None:
        """Block until ``n`` connections were accepted (bounded)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._conns) >= n, timeout=timeout):
                raise TimeoutError(f"HungServer: fewer than {n} connections after {timeout}s")

    def clients_established(self) -> int:
        """How many accepted connections are still ESTABLISHED on the client's side (the
        connecting process's socket, from /proc/net/tcp; the server's side never closes here).

        A count that was true at one instant, although /proc/net/tcp is read in pieces while
        connections come and go (see ``procfs.established_from``): only connections accepted
        before the read are looked for, each once. A client's socket is ESTABLISHED before the
        server can accept the connection and never becomes ESTABLISHED again once it left that
        state, so each one the read finds ESTABLISHED already was when the read began. A
        connection not accepted yet is not counted yet.
        """
        if self.host != "127.0.0.1":
            raise ValueError("clients_established reads /proc/net/tcp: 127.0.0.1 only")
        with self._cond:
            ports = list(self._peer_ports)
        return established_from(ports, self.port)


#: sockets bound (never listening) for the life of the test process, see dead_port()
_RESERVED: list[socket.socket] = []


def dead_port(host: str = "127.0.0.1") -> int:
    """A port on which connections are refused, for as long as the test process lives.

    The port stays bound (without ``listen``), so the kernel answers SYNs with RST and no other
    process can start listening on it mid-test — unlike "bind, close and hope".
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    _RESERVED.append(s)
    port: int = s.getsockname()[1]
    return port


class FullBacklog:
    """A listening socket whose accept queue is full and never drained: SYNs to it are
    dropped, so connecting hangs (what a firewalled or overloaded host looks like), on
    loopback. The queue is filled by connecting until one connect stays pending."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(16):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            self._fillers.append(s)
            _, writable, _ = select.select([], [s], [], 0.2)
            if not writable:
                return  # this SYN was dropped: the queue is full
        raise RuntimeError("could not fill the accept queue")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        for s in self._fillers:
            s.close()
        self._listener.close()
