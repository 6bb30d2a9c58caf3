"""The upstream side of the primary path, end to end: pooling, failures, retries, balancing.

One proxy process (module scope) fronts a dozen small loopback servers, one per behaviour,
each reached through its own route (`match: {host: NAME.test}`) so request paths stay free for
the backends' own conventions (`/delay/0.2`, `/reset`). Each test uses only its own backend, so
the counters it asserts on (connections accepted, requests recorded) are its own.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from support.backend import (
    FullBacklog,
    HungServer,
    Recorded,
    RecordingBackend,
    Reply,
    dead_port,
    echo_reply,
    pattern_bytes,
)
from support.proxy import HttpResponse, ProxyProcess, read_http_response

T = 5.0  # bound on every client read in this file
LOOPBACK = "127.0.0.1"


# -- clients ----------------------------------------------------------------------------------


def build_request(
    method: str,
    target: str,
    host: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def call(
    port: int,
    host: str,
    target: str = "/",
    method: str = "GET",
    body: bytes | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> HttpResponse:
    """One request on a fresh connection; the parsed response (bounded by T)."""
    with socket.create_connection((LOOPBACK, port), timeout=T) as sock:
        sock.sendall(build_request(method, target, host, headers, body))
        return read_http_response(sock, method, timeout=T)


def read_until_closed(sock: socket.socket, timeout: float = T) -> tuple[bytes, str]:
    """Everything the peer sends until it closes; and how it ended: eof, reset or timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        except TimeoutError:
            return data, "timeout"
        if not chunk:
            return data, "eof"
        data += chunk
    return data, "timeout"


def read_until(sock: socket.socket, marker: bytes, timeout: float = T) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while marker not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{marker!r} not received; have {data[:300]!r}")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before {marker!r}; have {data[:300]!r}")
        data += chunk
    return data


def unique(prefix: str) -> str:
    return f"/{prefix}-{uuid.uuid4().hex[:12]}"


# -- special upstreams ------------------------------------------------------------------------


class ScriptedUpstream:
    """Answers each request with canned bytes for its path, then, once `release` is set, resets
    the connection (RST): a backend that dies mid-response at a moment the test chooses."""

    def __init__(self, scripts: dict[str, bytes]) -> None:
        self.scripts = scripts
        self.release = threading.Event()
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> ScriptedUpstream:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.release.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(T)
        for t in self._threads:
            t.join(T)
        for s in self._socks:
            s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._socks.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(T)
        try:
            head = read_until(conn, b"\r\n\r\n")
        except (OSError, ConnectionError):
            return
        path = head.split(b" ", 2)[1].decode()
        conn.sendall(self.scripts[path])
        self.release.wait(T)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


class AnswerThenClose:
    """Answers each request `200 ok` with keep-alive framing, then closes its side at once
    (without `Connection: close`) and waits for the peer to close too. `peer_closed` counts
    connections the peer has closed: once it moves, the proxy has seen the close, so its pool
    no longer holds that connection. `requests` lists (connection number, request line)."""

    def __init__(self) -> None:
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self._listener.getsockname()[1]
        self.cond = threading.Condition()
        self.requests: list[tuple[int, str]] = []
        self.peer_closed = 0
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(T)
        for t in self._threads:
            t.join(T)

    def _accept(self) -> None:
        n = 0
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            n += 1
            t = threading.Thread(target=self._serve, args=(conn, n), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        with conn:
            conn.settimeout(T)
            try:
                data = read_until(conn, b"\r\n\r\n")
                head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = data.partition(b"\r\n\r\n")[2]
                while len(body) < length:
                    body += conn.recv(65536)
                with self.cond:
                    self.requests.append((n, head.split("\r\n")[0]))
                    self.cond.notify_all()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):
                    pass
            except (OSError, ConnectionError):
                return
            with self.cond:
                self.peer_closed += 1
                self.cond.notify_all()

    def wait_peer_closed(self, n: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.peer_closed >= n, T):
                raise TimeoutError(f"the proxy did not close {n} connection(s) within {T}s")


def stale_handler() -> Any:
    """Each connection answers one request; a later request on it is read and dropped by
    closing the connection without a byte of answer: the keep-alive race where the server
    times an idle connection out just as the proxy reuses it. `/always-drop...` is dropped on
    any connection, fresh or not."""
    served: set[int] = set()

    def handle(req: Recorded) -> Reply:
        if req.path.startswith("/always-drop") or req.connection_id in served:
            return Reply(action="close")
        served.add(req.connection_id)
        return echo_reply(req)

    return handle


# -- the module's proxy -----------------------------------------------------------------------


@dataclass
class Env:
    proxy: ProxyProcess
    reuse: RecordingBackend
    pool: RecordingBackend
    pool_peak: list[int]
    hung: HungServer
    stale: RecordingBackend
    closer: AnswerThenClose
    reset: RecordingBackend
    scripted: ScriptedUpstream
    rr_a: RecordingBackend
    rr_b: RecordingBackend
    w_a: RecordingBackend
    w_b: RecordingBackend

    @property
    def port(self) -> int:
        return self.proxy.port


def _route(name: str, backend: str) -> dict[str, Any]:
    return {"name": name, "match": {"host": f"{name}.test"}, "backend": backend}


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with contextlib.ExitStack() as stack:
        rb = [stack.enter_context(RecordingBackend()) for _ in range(8)]
        reuse, pool, stale, reset, rr_a, rr_b, w_a, w_b = rb
        stale.handler = stale_handler()
        pool_peak = [0]

        def pool_handler(req: Recorded) -> Reply:
            pool_peak[0] = max(pool_peak[0], pool.open_connections)
            return Reply(body=b"pooled", delay=0.2)

        pool.handler = pool_handler
        hung = stack.enter_context(HungServer())
        scripted = ScriptedUpstream(
            {
                "/cl": b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000,
                "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"8\r\npart-one\r\n8\r\npart-two\r\n",
            }
        ).start()
        stack.callback(scripted.stop)
        blackhole = FullBacklog()
        stack.callback(blackhole.close)
        closer = AnswerThenClose()
        stack.callback(closer.close)

        def be(url: str | list[str], **kw: Any) -> dict[str, Any]:
            return {"endpoints": url if isinstance(url, list) else [url], "timeout": "5s", **kw}

        config = {
            "backends": {
                "reuse": be(reuse.url),
                "pool": be(pool.url, max_connections=2, connect_timeout="5s"),
                "down": be(f"http://{LOOPBACK}:{dead_port()}", connect_timeout="1s"),
                "hung": be(hung.url, timeout="500ms"),
                "blackhole": be(blackhole.url, connect_timeout="300ms"),
                "stale": be(stale.url),
                "closer": be(closer.url),
                "reset": be(reset.url),
                "scripted": be(scripted.url),
                "rr": be([rr_a.url, rr_b.url]),
                "wa": be(w_a.url),
                "wb": be(w_b.url),
            },
            "routes": [
                _route("reuse", "reuse"),
                _route("pool", "pool"),
                _route("down", "down"),
                _route("hung", "hung"),
                _route("blackhole", "blackhole"),
                _route("stale", "stale"),
                _route("closer", "closer"),
                _route("reset", "reset"),
                _route("scripted", "scripted"),
                _route("rr", "rr"),
                {
                    "name": "canary",
                    "match": {"host": "canary.test"},
                    "backends": [{"backend": "wa", "weight": 90}, {"backend": "wb", "weight": 10}],
                },
                {
                    "name": "flip",
                    "match": {"host": "flip.test"},
                    "backends": [{"backend": "wa", "weight": 0}, {"backend": "wb", "weight": 100}],
                },
            ],
        }
        proxy = stack.enter_context(ProxyProcess(config))
        yield Env(
            proxy,
            reuse,
            pool,
            pool_peak,
            hung,
            stale,
            closer,
            reset,
            scripted,
            rr_a,
            rr_b,
            w_a,
            w_b,
        )
        proxy.stop()
        stderr = proxy.stderr_text()
        assert "Traceback" not in stderr, f"the proxy logged an exception:\n{stderr}"
        for b in rb:
            assert b.errors == [], f"RecordingBackend raised: {b.errors!r}"


# -- pooling ----------------------------------------------------------------------------------


def test_upstream_connection_reused_across_requests(env: Env) -> None:
    # 100 sequential requests on one client connection...
    with socket.create_connection((LOOPBACK, env.port), timeout=T) as sock:
        for i in range(100):
            sock.sendall(build_request("GET", f"/ka/{i}", "reuse.test"))
            resp = read_http_response(sock, timeout=T)
            assert resp.status == 200, resp
    # ...and 50 more, each on its own client connection: the upstream pool is per backend,
    # not per client connection
    for i in range(50):
        assert call(env.port, "reuse.test", f"/fresh/{i}").status == 200
    recs = env.reuse.wait_for_requests(150)
    assert len(recs) == 150
    assert env.reuse.connections_accepted == 1, (
        f"{env.reuse.connections_accepted} upstream connections for 150 sequential requests"
    )


def test_reuse_survives_bodyless_and_chunked_answers(env: Env) -> None:
    """HEAD, 204, 304 and chunked answers end at the right byte: the connection goes back to
    the pool clean, and the next answer on it is intact (not shifted by leftovers)."""
    sequence = [
        ("HEAD", "/bytes/1000", b""),
        ("GET", "/bytes/3000", pattern_bytes(3000)),
        ("GET", "/status/204", b""),
        ("GET", "/chunked/3", b"chunk-0\nchunk-1\nchunk-2\n"),
        ("GET", "/status/304", b""),
        ("HEAD", "/chunked/2", b""),
        ("GET", "/bytes/10", pattern_bytes(10)),
    ]
    before = len(env.reuse.requests)
    with socket.create_connection((LOOPBACK, env.port), timeout=T) as sock:
        for _ in range(3):
            for method, target, body in sequence:
                sock.sendall(build_request(method, target, "reuse.test"))
                resp = read_http_response(sock, method, timeout=T)
                assert resp.body == body, (method, target, resp)
    recs = env.reuse.requests[before:]
    assert len(recs) == 3 * len(sequence)
    assert len({r.connection_id for r in recs}) == 1, [r.connection_id for r in recs]


def test_pool_bounded_by_max_connections(env: Env) -> None:
    """`max_connections: 2`: ten concurrent slow requests share two upstream connections,
    the other requests wait for one instead of failing or opening more."""
    start = time.monotonic()
    with ThreadPoolExecutor(10) as ex:
        responses = list(ex.map(lambda i: call(env.port, "pool.test", f"/p/{i}"), range(10)))
    elapsed = time.monotonic() - start
    assert [r.status for r in responses] == [200] * 10, [(r.status, r.body) for r in responses]
    assert all(r.body == b"pooled" for r in responses)
    assert len(env.pool.requests) == 10
    assert env.pool.connections_accepted <= 2, env.pool.connections_accepted
    assert env.pool_peak[0] <= 2, f"backend saw {env.pool_peak[0]} open connections at once"
    # 10 requests x 0.2 s over 2 connections cannot finish before 5 rounds
    assert elapsed >= 0.95, f"10 requests done in {elapsed:.2f}s: more than 2 ran at once"


# -- failures ---------------------------------------------------------------------------------


def assert_short_text_naming(resp: HttpResponse, backend: str) -> None:
    ctype = resp.header("content-type") or ""
    assert ctype.startswith("text/plain"), resp.headers
    text = resp.body.decode()
    assert backend in text, text
    assert 0 < len(resp.body) <= 300, text


def test_connection_refused_is_502_naming_backend(env: Env) -> None:
    start = time.monotonic()
    resp = call(env.port, "down.test", "/x")
    assert time.monotonic() - start < 1.0
    assert resp.status == 502, resp
    assert_short_text_naming(resp, "down")


def test_response_timeout_is_504_naming_backend(env: Env) -> None:
    """`timeout: 500ms` against a backend that accepts and never answers."""
    start = time.monotonic()
    resp = call(env.port, "hung.test", "/x")
    elapsed = time.monotonic() - start
    assert resp.status == 504, resp
    assert_short_text_naming(resp, "hung")
    assert env.hung.connections_accepted >= 1  # it did connect: this is the response timeout
    assert 0.45 <= elapsed < 2.0, f"answered after {elapsed:.2f}s for a 500ms timeout"


def test_connect_timeout_answers_quickly_naming_backend(env: Env) -> None:
    """`connect_timeout: 300ms` against an address whose SYNs are dropped. The issue calls an
    unreachable backend 502 and a timeout 504; docs/config.md says 502 for connect timeouts:
    either is accepted here, a hang or another status is not."""
    start = time.monotonic()
    resp = call(env.port, "blackhole.test", "/x")
    elapsed = time.monotonic() - start
    assert resp.status in (502, 504), resp
    assert_short_text_naming(resp, "blackhole")
    assert "connect" in resp.body.decode().lower(), resp.body
    assert 0.25 <= elapsed < 2.0, f"answered after {elapsed:.2f}s for a 300ms connect timeout"


# -- stale pooled connections -----------------------------------------------------------------


def arrivals(backend: RecordingBackend, target: str) -> list[Recorded]:
    return [r for r in backend.requests if r.target == target]


@pytest.mark.parametrize(
    ("method", "body", "retry"),
    [
        ("GET", None, True),
        ("PUT", b"put-body-" * 100, True),  # idempotent: resent with the same body
        ("DELETE", None, True),
        ("POST", b'{"order": 1}', False),
        ("POST", None, False),  # sent (its head went out): not idempotent, never resent
        ("PATCH", b"patch", False),
    ],
)
def test_stale_pooled_connection(env: Env, method: str, body: bytes | None, retry: bool) -> None:
    """The backend drops the pooled connection as the request arrives on it, unanswered.

    Idempotent requests are retried once on a fresh connection and succeed; others were sent,
    so they may not be sent again: the client gets 502 and the backend saw the request once.
    """
    warm = unique("warm")
    assert call(env.port, "stale.test", warm).status == 200
    # the answered copy of `warm` is the last; its connection now sits idle in the pool
    pooled_conn = arrivals(env.stale, warm)[-1].connection_id

    target = unique(method.lower())
    resp = call(env.port, "stale.test", target, method=method, body=body)
    got = arrivals(env.stale, target)
    assert got, "the request never reached the backend: the pooled connection was not used"
    assert got[0].connection_id == pooled_conn, "the request did not go over the pooled conn"
    if retry:
        assert resp.status == 200, resp
        assert len(got) == 2, [r.connection_id for r in got]
        assert got[1].connection_id != pooled_conn
        assert got[1].body == got[0].body == (body or b"")
    else:
        assert len(got) == 1, (
            f"{method} sent {len(got)} times to the backend (connections "
            f"{[r.connection_id for r in got]}): a non-idempotent request was retried"
        )
        assert resp.status == 502, resp
        assert_short_text_naming(resp, "stale")


def test_stale_retry_happens_once(env: Env) -> None:
    """The fresh connection of the retry fails too: 502, after exactly two attempts."""
    warm = unique("warm")
    assert call(env.port, "stale.test", warm).status == 200
    target = unique("always-drop")
    resp = call(env.port, "stale.test", target)
    assert resp.status == 502, resp
    assert len(arrivals(env.stale, target)) == 2


def test_connection_closed_by_backend_while_idle_is_not_reused(env: Env) -> None:
    """The backend closes a keep-alive connection right after answering (without saying so).
    Once the proxy has seen that close, the next request, even a POST, goes over a fresh
    connection: nothing was sent on the dead one, so nothing is lost or doubled."""
    before = len(env.closer.requests)
    assert call(env.port, "closer.test", "/first").body == b"ok"
    env.closer.wait_peer_closed(before + 1)  # one request per connection
    resp = call(env.port, "closer.test", "/order", method="POST", body=b"{}")
    assert resp.status == 200 and resp.body == b"ok", resp
    posts = [r for r in env.closer.requests if r[1].startswith("POST /order")]
    assert len(posts) == 1, env.closer.requests


# -- resets mid-response ----------------------------------------------------------------------


def split_head(data: bytes) -> tuple[str, dict[str, str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head: {data[:300]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines:
        k, _, v = line.partition(":")
        fields[k.strip().lower()] = v.strip()
    return status_line, fields, body


def test_backend_reset_mid_body_is_never_a_complete_response(env: Env) -> None:
    """`/reset`: Content-Length 16384, 8192 body bytes, then RST."""
    with socket.create_connection((LOOPBACK, env.port), timeout=T) as sock:
        sock.sendall(build_request("GET", "/reset", "reset.test"))
        data, how = read_until_closed(sock)
    assert how in ("eof", "reset"), f"connection left open after the backend reset ({how})"
    status_line, fields, body = split_head(data)
    assert status_line.startswith("HTTP/1.1 200"), status_line
    length = int(fields["content-length"])
    assert length == 16384, fields
    assert len(body) < length, "a truncated upstream body reached the client as complete"


def chunks_of(body: bytes) -> tuple[list[bytes], bool]:
    """Parse a chunked body as far as it goes: the chunks, and whether the 0-chunk came."""
    out = []
    rest = body
    while b"\r\n" in rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out, True
        if len(rest) < size + 2:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return out, False


@pytest.mark.parametrize("framing", ["cl", "chunked"])
def test_backend_reset_after_body_started(env: Env, framing: str) -> None:
    """The reset comes after the client already has the head and part of the body (the test
    releases it then), for a Content-Length and a chunked upstream response: the client's
    connection is closed, and the body is visibly incomplete (short, or no 0-chunk)."""
    env.scripted.release.clear()
    with socket.create_connection((LOOPBACK, env.port), timeout=T) as sock:
        sock.sendall(build_request("GET", f"/{framing}", "scripted.test"))
        marker = b"x" * 1000 if framing == "cl" else b"part-two"
        first = read_until(sock, marker)
        env.scripted.release.set()
        rest, how = read_until_closed(sock)
    assert how in ("eof", "reset"), f"client connection left open after upstream reset ({how})"
    status_line, fields, body = split_head(first + rest)
    assert status_line.startswith("HTTP/1.1 200"), status_line
    if framing == "cl":
        assert int(fields["content-length"]) == 100000, fields
        assert len(body) < 100000
    else:
        assert fields.get("transfer-encoding") == "chunked", fields
        got, terminated = chunks_of(body)
        assert b"".join(got) == b"part-onepart-two"
        assert not terminated, "the client got a terminating 0-chunk for a truncated body"


# -- balancing --------------------------------------------------------------------------------


def test_round_robin_over_endpoints(env: Env) -> None:
    for i in range(100):
        assert call(env.port, "rr.test", f"/rr/{i}").status == 200
    a, b = len(env.rr_a.requests), len(env.rr_b.requests)
    assert a + b == 100
    assert (a, b) == (50, 50), f"round robin split {a}/{b}"


def hosts_seen(backend: RecordingBackend, host: str) -> int:
    return sum(1 for r in backend.requests if r.header("host") == host)


def test_weighted_split_is_exact(env: Env) -> None:
    for i in range(100):
        assert call(env.port, "canary.test", f"/c/{i}").status == 200
    assert (hosts_seen(env.w_a, "canary.test"), hosts_seen(env.w_b, "canary.test")) == (90, 10)


def test_weight_zero_sends_everything_to_the_other_leg(env: Env) -> None:
    for i in range(100):
        assert call(env.port, "flip.test", f"/f/{i}").status == 200
    assert (hosts_seen(env.w_a, "flip.test"), hosts_seen(env.w_b, "flip.test")) == (0, 100)
