"""The downstream HTTP/1.1 server, end to end (issue 2, "Downstream server").

A real proxy process in front of real backends on 127.0.0.1, driven with raw sockets so every
byte on the wire is visible: keep-alive and upstream pooling, pipelining in order, request
bodies (Content-Length and chunked) arriving exact, response framing per client version, HEAD,
204/304, ``Expect: 100-continue``, HTTP/1.0 clients, a streamed 1 GiB upload and a
200 MiB download that the client stops reading (the proxy's memory stays bounded), the header
and idle timeouts, large response headers, and 200 concurrent clients.

Two backends: the h11-based :class:`RecordingBackend` (records every request) and, for what
h11 will not do on purpose, :class:`RawBackend` below (close-delimited answers, uploads counted
without being stored, huge answers streamed from a constant block, an upload it stops reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from support.backend import Recorded, RecordingBackend, Reply, default_handler, pattern_bytes
from support.proxy import HttpResponse, ProxyProcess, ResponseReader, basic_config

T = 5.0  # bound on every single read/exchange in this file
MiB = 1024 * 1024
SMALL_MAX_BODY = 1024  # max_body of the /small route
BLOCK = pattern_bytes(MiB)  # 1 MiB is a multiple of 256, so the pattern continues across blocks
PATTERN_EXT = pattern_bytes(MiB + 256)  # any slice of the pattern up to 1 MiB long, any offset
RSS_LIMIT_KIB = 150 * 1024
#: 1 GiB takes ~3 s here; SHADOWLANE_BIG_UPLOAD=0 makes it 256 MiB for a slow machine
BIG_UPLOAD = (256 if os.environ.get("SHADOWLANE_BIG_UPLOAD") == "0" else 1024) * MiB


# -- a raw-socket backend ---------------------------------------------------------------------


class RawBackend:
    """One request per connection, answered by hand on a raw socket, then closed.

    Paths:
    - ``/raw/close-delimited/N``: N pattern bytes, no Content-Length, no chunking: the body ends
      when the connection closes (RFC 9112 6.3, rule 8).
    - ``/raw/upload``: reads a Content-Length body in 1 MiB pieces, counting bytes and CRC32
      without keeping them; answers ``{"count": n, "crc": c}``.
    - ``/raw/stalled-upload``: like upload, but stops reading after 1 MiB until ``release``
      is set: a backend slower than the client.
    - ``/raw/big/N``: N pattern bytes with a Content-Length, written 1 MiB at a time;
      ``sent`` says how far it got (it blocks when nobody reads).
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self.uploads: list[tuple[int, int]] = []
        self.upload_read = 0  # bytes of the current upload read so far
        self.sent = 0  # bytes of /raw/big bodies written so far
        self.errors: list[BaseException] = []
        self.release = threading.Event()
        self._accept = threading.Thread(target=self._accept_loop, name="RawBackend", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._accept.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release.set()
        self._wake_w.send(b"x")
        self._accept.join(T)
        with self._cond:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(T)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = T) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"RawBackend: no {what} after {timeout}s")

    def _accept_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._listener, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            conn, _ = self._listener.accept()
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._cond:
                self._conns.add(conn)
                self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(30)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _method, target, _version = lines[0].split(" ")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                self._dispatch(conn, target, headers, rest)
        except (ConnectionError, TimeoutError):
            pass
        except BaseException as e:  # a harness bug: the fixture reports it
            with self._cond:
                self.errors.append(e)
        finally:
            with self._cond:
                self._conns.discard(conn)

    def _dispatch(
        self, conn: socket.socket, target: str, headers: dict[str, str], rest: bytes
    ) -> None:
        if m := re.fullmatch(r"/raw/close-delimited/(\d+)", target):
            body = pattern_bytes(int(m.group(1)))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            for i in range(0, len(body), 1000):  # in pieces, so the proxy sees several reads
                conn.sendall(body[i : i + 1000])
            conn.shutdown(socket.SHUT_WR)
            return
        if target in ("/raw/upload", "/raw/stalled-upload"):
            self._upload(conn, int(headers["content-length"]), rest, target != "/raw/upload")
            return
        if m := re.fullmatch(r"/raw/big/(\d+)", target):
            n = int(m.group(1))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            view = memoryview(BLOCK)
            while n > 0:
                piece = view[: min(n, MiB)]
                conn.sendall(piece)
                n -= len(piece)
                with self._cond:
                    self.sent += len(piece)
                    self._cond.notify_all()
            return
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def _upload(self, conn: socket.socket, length: int, rest: bytes, stall: bool) -> None:
        count, crc = len(rest), zlib.crc32(rest)
        with self._cond:
            self.upload_read = count
        buf = bytearray(MiB)
        view = memoryview(buf)
        while count < length:
            if stall and count >= MiB and not self.release.is_set():
                self.release.wait(30)
            n = conn.recv_into(view, min(MiB, length - count))
            if not n:
                break
            count += n
            crc = zlib.crc32(view[:n], crc)
            with self._cond:
                self.upload_read = count
                self._cond.notify_all()
        with self._cond:
            self.uploads.append((count, crc))
            self._cond.notify_all()
        body = json.dumps({"count": count, "crc": crc}).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )


# -- fixtures ----------------------------------------------------------------------------------

BIG_HEADER = "h" * 30000
MANY_HEADERS = [(f"X-Many-{i:03d}", f"value-{i}") for i in range(300)]


def handler(rec: Recorded) -> Reply:
    if rec.path == "/big-headers":
        return Reply(headers=[("X-Big", BIG_HEADER), *MANY_HEADERS], body=b"big headers")
    return default_handler(rec)


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    with RecordingBackend(handler) as b:
        yield b
    assert b.errors == [], f"RecordingBackend raised: {b.errors!r}"


@pytest.fixture(scope="module")
def raw() -> Iterator[RawBackend]:
    with RawBackend() as r:
        yield r
    assert r.errors == [], f"RawBackend raised: {r.errors!r}"


def _config(backend: RecordingBackend, raw: RawBackend, **limits: str) -> dict[str, object]:
    config = basic_config(backend.url, timeout="10s")
    # At most 64 upstream connections (below the test backend's listen backlog of 100), all kept
    # idle between requests: 200 concurrent clients share them, and none is churned.
    config["backends"]["b1"].update(max_connections=64, max_idle=64, connect_timeout="5s")
    config["backends"]["raw"] = {"endpoints": [raw.url], "timeout": "10s"}
    config["routes"][:0] = [
        {
            "name": "small",
            "match": {"path_prefix": "/small"},
            "backend": "b1",
            "max_body": f"{SMALL_MAX_BODY}B",
        },
        {"name": "raw", "match": {"path_prefix": "/raw"}, "backend": "raw", "max_body": "2GiB"},
    ]
    # a connection left busy by a proxy bug must not hold the module's teardown for 30 s
    config["limits"] = {"drain_timeout": "2s", **limits}
    return config


@pytest.fixture(scope="module")
def proxy(
    backend: RecordingBackend, raw: RawBackend, request: pytest.FixtureRequest
) -> Iterator[ProxyProcess]:
    failed_before = request.session.testsfailed
    with ProxyProcess(_config(backend, raw)) as p:
        yield p
        if request.session.testsfailed > failed_before:
            print(f"--- proxy pid {p.pid} stderr ---\n{p.stderr_text()}")


@pytest.fixture(scope="module")
def timeout_proxy(
    backend: RecordingBackend, raw: RawBackend, request: pytest.FixtureRequest
) -> Iterator[ProxyProcess]:
    """A proxy with 1 s header and idle timeouts (the module's main one keeps the defaults)."""
    failed_before = request.session.testsfailed
    config = _config(backend, raw, header_timeout="1s", idle_timeout="1s")
    with ProxyProcess(config) as p:
        yield p
        if request.session.testsfailed > failed_before:
            print(f"--- proxy pid {p.pid} stderr ---\n{p.stderr_text()}")


# -- helpers -----------------------------------------------------------------------------------


def connect(proxy: ProxyProcess) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=T)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def get(target: str, *headers: str, method: str = "GET", version: str = "1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}"]
    if version == "1.1":
        lines.append("Host: example.test")
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post(target: str, body: bytes, *headers: str) -> bytes:
    h = [f"POST {target} HTTP/1.1", "Host: example.test", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(h) + "\r\n\r\n").encode("latin-1") + body


def echoed(resp: HttpResponse) -> dict[str, object]:
    assert resp.status == 200, f"{resp.status} {resp.body[:300]!r}"
    data: dict[str, object] = json.loads(resp.body)
    return data


def assert_closed(sock: socket.socket, reader: ResponseReader, timeout: float = T) -> float:
    """Wait (bounded) for the peer to close; nothing may arrive first. Returns when it closed."""
    assert bytes(reader.buf) == b"", f"unexpected bytes {bytes(reader.buf[:200])!r}"
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return time.monotonic()
        except TimeoutError:
            break
        if not data:
            return time.monotonic()
        raise AssertionError(f"unexpected bytes before close: {data[:200]!r}")
    raise AssertionError(f"connection still open after {timeout}s")


def assert_still_open(sock: socket.socket, reader: ResponseReader, proxy: ProxyProcess) -> None:
    """Prove keep-alive: another request on the same socket gets its answer."""
    sock.sendall(get("/still-open"))
    target = echoed(reader.read(timeout=T))["target"]
    assert target == "/still-open", f"the next answer on this connection was for {target}"


def proxy_rss_kib(proxy: ProxyProcess, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{proxy.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{proxy.pid}/status")


def reset_peak_rss(proxy: ProxyProcess) -> None:
    """Reset the proxy's VmHWM to its current RSS (Linux clear_refs, "5"), so a peak measured
    afterwards belongs to this test alone."""
    Path(f"/proc/{proxy.pid}/clear_refs").write_text("5")


def wait_for_stall(
    read: Callable[[], int], what: str, quiet: float = 0.5, timeout: float = 15.0
) -> int:
    """Poll a progress counter until it stops moving for ``quiet`` seconds; return its value."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while True:
        time.sleep(0.05)
        now, value = time.monotonic(), read()
        if value != last:
            last, since = value, now
        elif now - since >= quiet:
            return value
        if now > deadline:
            raise TimeoutError(f"{what} never stalled in {timeout}s (at {value})")


def recv_pattern(sock: socket.socket, first: bytes, n: int, timeout: float) -> int:
    """Read ``n`` body bytes (``first`` already read) and check each against the pattern;
    returns how many matched."""
    deadline = time.monotonic() + timeout
    got = len(first)
    assert first == PATTERN_EXT[:got]
    buf = bytearray(MiB)
    view = memoryview(buf)
    while got < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        k = sock.recv_into(view, min(MiB, n - got))
        assert k, f"connection closed after {got} of {n} bytes"
        off = got % 256
        assert view[:k] == PATTERN_EXT[off : off + k], f"body differs near byte {got}"
        got += k
    return got


# -- keep-alive and pooling --------------------------------------------------------------------


def test_keep_alive_many_requests_one_socket(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    n_before, conns_before = len(backend.requests), backend.connections_accepted
    with connect(proxy) as sock:
        reader = ResponseReader(sock)
        for i in range(50):
            sock.sendall(get(f"/ka/{i}"))
            assert echoed(reader.read(timeout=T))["target"] == f"/ka/{i}"
    recs = backend.wait_for_requests(n_before + 50)[n_before:]
    assert [r.target for r in recs] == [f"/ka/{i}" for i in range(50)]
    # sequential requests need one upstream connection, reused: pooling
    assert backend.connections_accepted - conns_before <= 1
    assert len({r.connection_id for r in recs}) == 1


def test_upstream_connections_reused_across_client_connections(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    n_before, conns_before = len(backend.requests), backend.connections_accepted
    for i in range(20):
        with connect(proxy) as sock:
            sock.sendall(get(f"/new-client/{i}", "Connection: close"))
            reader = ResponseReader(sock)
            assert echoed(reader.read(timeout=T))["target"] == f"/new-client/{i}"
            assert_closed(sock, reader)
    backend.wait_for_requests(n_before + 20)
    assert backend.connections_accepted - conns_before <= 1


# -- pipelining --------------------------------------------------------------------------------


def test_pipelined_requests_answered_in_order(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """Five requests in one write; the first is the slowest, so answering each as soon as its
    backend answer arrives would reorder them."""
    delays = ["0.3", "0", "0.2", "0", "0.1"]
    targets = [f"/delay/{d}?i={i}" for i, d in enumerate(delays)]
    n_before = len(backend.requests)
    with connect(proxy) as sock:
        sock.sendall(b"".join(get(t) for t in targets))
        reader = ResponseReader(sock)
        got = [echoed(reader.read(timeout=T))["target"] for _ in targets]
        assert got == targets
        assert_still_open(sock, reader, proxy)
    recs = backend.wait_for_requests(n_before + 6)[n_before:]
    assert [r.target for r in recs[:5]] == targets


def test_pipelined_requests_with_bodies_keep_their_bodies(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    n_before = len(backend.requests)
    bodies = [b"", b"first body", pattern_bytes(70000), b"x", b"last"]
    data = b""
    for i, body in enumerate(bodies):
        if i == 3:  # one chunked in the middle
            data += (
                b"POST /pb/3 HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"1\r\nx\r\n0\r\n\r\n"
            )
        else:
            data += post(f"/pb/{i}", body)
    with connect(proxy) as sock:
        sock.sendall(data)
        reader = ResponseReader(sock)
        for i, body in enumerate(bodies):
            e = echoed(reader.read(timeout=T))
            assert (e["target"], e["body_len"]) == (f"/pb/{i}", len(body))
    recs = backend.wait_for_requests(n_before + 5)[n_before:]
    assert [r.body for r in recs] == bodies


# -- request bodies ----------------------------------------------------------------------------


def test_content_length_body_arrives_exact(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    body = pattern_bytes(300_000)
    n_before = len(backend.requests)
    with connect(proxy) as sock:
        sock.sendall(post("/cl-body", body, "Content-Type: application/octet-stream"))
        e = echoed(ResponseReader(sock).read(timeout=T))
    assert e["body_len"] == len(body)
    (rec,) = backend.wait_for_requests(n_before + 1)[n_before:]
    assert rec.body == body
    assert rec.header_values("content-length") == [str(len(body))]
    assert rec.header("transfer-encoding") is None


def test_chunked_body_arrives_exact(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    """Odd chunk sizes, a chunk extension and a trailer; sent in small writes so the proxy
    forwards it while it is still arriving."""
    sizes = [1, 4096, 7, 65539, 300, 1]
    data = pattern_bytes(sum(sizes))
    n_before = len(backend.requests)
    with connect(proxy) as sock:
        sock.sendall(b"POST /chunked-body HTTP/1.1\r\nHost: example.test\r\n")
        sock.sendall(b"Transfer-Encoding: chunked\r\n\r\n")
        off = 0
        for i, size in enumerate(sizes):
            ext = b";name=value" if i == 2 else b""
            sock.sendall(b"%x%s\r\n" % (size, ext) + data[off : off + size] + b"\r\n")
            off += size
        sock.sendall(b"0\r\nX-Trailer: t\r\n\r\n")
        e = echoed(ResponseReader(sock).read(timeout=T))
    assert e["body_len"] == len(data)
    (rec,) = backend.wait_for_requests(n_before + 1)[n_before:]
    assert rec.body == data
    te = rec.header_values("transfer-encoding")
    cl = rec.header_values("content-length")
    # forwarded either chunked or length-framed, never both, never neither
    assert (te, cl) in ((["chunked"], []), ([], [str(len(data))])), rec.headers


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_client_gone_mid_upload_never_completes_upstream(
    proxy: ProxyProcess, backend: RecordingBackend, framing: str
) -> None:
    """The client sends part of a body and disconnects: the backend has seen the start of the
    upload, and must see its connection closed, never a complete request."""
    target = f"/cut-upload/{framing}"
    raw_before = backend.raw_bytes
    with connect(proxy) as sock:
        if framing == "chunked":
            sock.sendall(get(target, "Transfer-Encoding: chunked", method="POST"))
            sock.sendall(b"5\r\nhello\r\n")
        else:
            sock.sendall(get(target, "Content-Length: 10", method="POST") + b"hello")
        backend.wait_for(lambda b: b.raw_bytes - raw_before > len(target) + 5, timeout=T)
        open_during = backend.open_connections
    backend.wait_for(lambda b: b.open_connections < open_during, timeout=T)
    assert not any(r.target == target for r in backend.requests)


def test_connection_close_ends_a_pipeline(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    n_before = len(backend.requests)
    with connect(proxy) as sock:
        sock.sendall(get("/closing", "Connection: close") + get("/never-served"))
        reader = ResponseReader(sock)
        resp = reader.read(timeout=T)
        assert echoed(resp)["target"] == "/closing"
        assert (resp.header("connection") or "").lower() == "close"
        assert_closed(sock, reader)
    with connect(proxy) as sock:  # a later request: anything forwarded before it has arrived
        sock.sendall(get("/after-close"))
        assert echoed(ResponseReader(sock).read(timeout=T))["target"] == "/after-close"
    recs = backend.wait_for_requests(n_before + 2)[n_before:]
    assert [r.target for r in recs] == ["/closing", "/after-close"]


# -- response framing --------------------------------------------------------------------------

CHUNKED_BODY = b"".join(f"chunk-{i}\n".encode() for i in range(50))


def test_chunked_response_to_http11_client_stays_chunked(proxy: ProxyProcess) -> None:
    with connect(proxy) as sock:
        sock.sendall(get("/chunked/50"))
        reader = ResponseReader(sock)
        resp = reader.read(timeout=T)
        assert resp.status == 200
        assert resp.header_values("transfer-encoding") == ["chunked"]
        assert resp.header("content-length") is None
        assert resp.body == CHUNKED_BODY
        assert_still_open(sock, reader, proxy)


def test_chunked_response_to_http10_client_is_close_delimited(proxy: ProxyProcess) -> None:
    with connect(proxy) as sock:
        sock.sendall(get("/chunked/50", version="1.0"))
        reader = ResponseReader(sock)
        resp = reader.read(timeout=T)
    assert resp.status == 200
    assert resp.header("transfer-encoding") is None
    assert resp.header("content-length") is None
    assert resp.close_delimited
    assert resp.body == CHUNKED_BODY


def test_close_delimited_response_to_http11_client_becomes_chunked(proxy: ProxyProcess) -> None:
    body = pattern_bytes(25_000)
    with connect(proxy) as sock:
        sock.sendall(get("/raw/close-delimited/25000"))
        reader = ResponseReader(sock)
        resp = reader.read(timeout=T)
        assert resp.status == 200
        assert resp.header_values("transfer-encoding") == ["chunked"]
        assert resp.body == body
        assert_still_open(sock, reader, proxy)  # the client keeps its connection


def test_close_delimited_response_to_http10_client_stays_close_delimited(
    proxy: ProxyProcess,
) -> None:
    body = pattern_bytes(25_000)
    with connect(proxy) as sock:
        sock.sendall(get("/raw/close-delimited/25000", version="1.0"))
        resp = ResponseReader(sock).read(timeout=T)
    assert resp.status == 200
    assert resp.header("transfer-encoding") is None and resp.header("content-length") is None
    assert resp.close_delimited
    assert resp.body == body


def test_content_length_response_byte_exact(proxy: ProxyProcess) -> None:
    with connect(proxy) as sock:
        sock.sendall(get("/bytes/1000003"))
        reader = ResponseReader(sock)
        resp = reader.read(timeout=T)
        assert resp.header("content-length") == "1000003"
        assert resp.body == pattern_bytes(1000003)
        assert_still_open(sock, reader, proxy)


# -- HEAD, 204, 304 ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/bytes/1234", "/chunked/5"], ids=["length", "chunked"])
def test_head_has_no_body(proxy: ProxyProcess, backend: RecordingBackend, target: str) -> None:
    with connect(proxy) as sock:
        sock.sendall(get(target, method="HEAD"))
        reader = ResponseReader(sock)
        resp = reader.read("HEAD", timeout=T)
        assert resp.status == 200
        if target == "/bytes/1234":
            assert resp.header("content-length") == "1234"  # preserved, describes the GET
        # no body bytes: the next response must start right where this head ended
        assert_still_open(sock, reader, proxy)
    assert any(r.method == "HEAD" and r.target == target for r in backend.requests)


@pytest.mark.parametrize("target", ["/bytes/1234", "/chunked/5"], ids=["length", "chunked"])
def test_head_followed_by_pipelined_get(
    proxy: ProxyProcess, backend: RecordingBackend, target: str
) -> None:
    """HEAD then GET in one write: the GET's answer must not be taken for the body the HEAD
    answer announced (its Content-Length or chunking describe a body that never comes)."""
    with connect(proxy) as sock:
        sock.sendall(get(target, method="HEAD") + get("/after-head"))
        reader = ResponseReader(sock)
        head = reader.read("HEAD", timeout=T)
        assert head.status == 200
        after = reader.read(timeout=T)
        assert echoed(after)["target"] == "/after-head"
        assert_still_open(sock, reader, proxy)


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(proxy: ProxyProcess, status: int) -> None:
    with connect(proxy) as sock:
        sock.sendall(get(f"/status/{status}"))
        reader = ResponseReader(sock)
        resp = reader.read(timeout=T)
        assert resp.status == status
        assert resp.header("transfer-encoding") is None
        if status == 204:
            assert resp.header("content-length") in (None, "0")
        assert_still_open(sock, reader, proxy)


# -- Expect: 100-continue ----------------------------------------------------------------------


def test_expect_100_continue(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    body = b"sent only after 100 Continue"
    n_before = len(backend.requests)
    with connect(proxy) as sock:
        sock.sendall(
            b"POST /expect HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n"
            b"Expect: 100-continue\r\n\r\n" % len(body)
        )
        reader = ResponseReader(sock)
        interim = reader.read(timeout=T, skip_interim=False)
        assert interim.status == 100
        # the backend cannot have a complete request yet
        assert not any(r.target == "/expect" for r in backend.requests[n_before:])
        sock.sendall(body)
        e = echoed(reader.read(timeout=T))
        assert e["body_len"] == len(body)
        assert_still_open(sock, reader, proxy)
    rec = backend.wait_for_requests(n_before + 1)[n_before]
    assert rec.body == body
    assert rec.header("expect") is None  # answered by the proxy, not forwarded


def test_expect_100_continue_chunked(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    n_before = len(backend.requests)
    with connect(proxy) as sock:
        sock.sendall(
            b"POST /expect-chunked HTTP/1.1\r\nHost: example.test\r\n"
            b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
        )
        reader = ResponseReader(sock)
        assert reader.read(timeout=T, skip_interim=False).status == 100
        sock.sendall(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        e = echoed(reader.read(timeout=T))
        assert (e["target"], e["body_len"]) == ("/expect-chunked", 11)
        # one request, one answer: the next answer on this socket is for the next request
        assert_still_open(sock, reader, proxy)
    recs = backend.wait_for_requests(n_before + 2)[n_before:]
    assert [(r.target, r.body) for r in recs] == [
        ("/expect-chunked", b"hello world"),
        ("/still-open", b""),
    ]


def test_expect_100_continue_too_large_gets_413_without_body(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    n_before = len(backend.requests)
    with connect(proxy) as sock:
        sock.sendall(
            b"POST /small/expect HTTP/1.1\r\nHost: example.test\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (SMALL_MAX_BODY * 10)
        )
        reader = ResponseReader(sock)
        resp = reader.read(timeout=T, skip_interim=False)  # no 100 first
        assert resp.status == 413
        assert_closed(sock, reader)
    with connect(proxy) as sock:  # a later request, so anything forwarded before it has arrived
        sock.sendall(get("/after-413"))
        assert echoed(ResponseReader(sock).read(timeout=T))["target"] == "/after-413"
    recs = backend.wait_for_requests(n_before + 1)[n_before:]
    assert [r.target for r in recs] == ["/after-413"]


# -- HTTP/1.0 clients --------------------------------------------------------------------------


def test_http10_without_host(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    n_before = len(backend.requests)
    with connect(proxy) as sock:
        sock.sendall(get("/h10", version="1.0"))
        reader = ResponseReader(sock)
        e = echoed(reader.read(timeout=T))
        assert e["target"] == "/h10"
        assert_closed(sock, reader)  # HTTP/1.0 without keep-alive: one request per connection
    (rec,) = backend.wait_for_requests(n_before + 1)[n_before:]
    assert rec.header_values("host") == [f"127.0.0.1:{backend.port}"]


def test_http10_expect_100_continue_is_ignored(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """RFC 9110 10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0 request
    (a 1.0 client does not know interim answers)."""
    raw_before = backend.raw_bytes
    with connect(proxy) as sock:
        sock.sendall(
            b"POST /expect10 HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        # once the head reached the backend, the proxy has decided whether to send a 100
        backend.wait_for(lambda b: b.raw_bytes > raw_before, timeout=T)
        early = select.select([sock], [], [], 0.2)[0]
        assert not early, f"proxy sent {sock.recv(200)!r} to an HTTP/1.0 client"
        sock.sendall(b"abc")
        reader = ResponseReader(sock)
        e = echoed(reader.read(timeout=T, skip_interim=False))
        assert (e["target"], e["body_len"]) == ("/expect10", 3)


def test_http10_keep_alive(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    with connect(proxy) as sock:
        reader = ResponseReader(sock)
        for i in range(3):
            sock.sendall(get(f"/h10ka/{i}", "Connection: keep-alive", version="1.0"))
            resp = reader.read(timeout=T)
            assert echoed(resp)["target"] == f"/h10ka/{i}"
            assert (resp.header("connection") or "").lower() == "keep-alive"
            assert resp.header("content-length") is not None
        # an answer of unknown length must end the 1.0 connection (close-delimited)
        sock.sendall(get("/chunked/3", "Connection: keep-alive", version="1.0"))
        resp = reader.read(timeout=T)
        assert resp.close_delimited
        assert resp.body == b"chunk-0\nchunk-1\nchunk-2\n"
    rec = next(r for r in backend.requests if r.target == "/h10ka/0")
    assert rec.header("connection") is None  # hop-by-hop, not forwarded


# -- memory: a streamed upload and a response the client does not read --------------------------


def test_streamed_upload_is_not_held_in_memory(proxy: ProxyProcess, raw: RawBackend) -> None:
    """BIG_UPLOAD bytes (1 GiB; 256 MiB with SHADOWLANE_BIG_UPLOAD=0), generated as they are
    sent, counted (and CRC'd) by the backend without being stored."""
    reset_peak_rss(proxy)
    expected_crc = 0
    for _ in range(BIG_UPLOAD // MiB):
        expected_crc = zlib.crc32(BLOCK, expected_crc)
    uploads_before = len(raw.uploads)
    t0 = time.monotonic()
    with connect(proxy) as sock:
        sock.sendall(
            b"POST /raw/upload HTTP/1.1\r\nHost: example.test\r\nContent-Type: "
            b"application/octet-stream\r\nContent-Length: %d\r\n\r\n" % BIG_UPLOAD
        )
        sock.settimeout(60)
        for _ in range(BIG_UPLOAD // MiB):
            sock.sendall(BLOCK)
        resp = ResponseReader(sock).read(timeout=60)
    elapsed = time.monotonic() - t0
    assert resp.status == 200, resp.body
    assert json.loads(resp.body) == {"count": BIG_UPLOAD, "crc": expected_crc}
    assert raw.uploads[uploads_before:] == [(BIG_UPLOAD, expected_crc)]
    peak = proxy_rss_kib(proxy)
    assert peak < RSS_LIMIT_KIB, f"proxy peak RSS {peak} KiB during a {BIG_UPLOAD} B upload"
    print(f"upload {BIG_UPLOAD / MiB:.0f} MiB in {elapsed:.1f}s, proxy peak RSS {peak} KiB")


def test_upload_to_a_stalled_backend_pauses_the_client(
    proxy: ProxyProcess, raw: RawBackend
) -> None:
    """Flow control upstream: while the backend does not read, the proxy stops reading the
    client (its sends block) instead of buffering; when the backend reads again, all arrives."""
    size = 200 * MiB
    reset_peak_rss(proxy)
    raw.release.clear()
    uploads_before = len(raw.uploads)
    sent = [0]
    errors: list[BaseException] = []

    with connect(proxy) as sock:
        sock.settimeout(60)

        def send() -> None:
            try:
                sock.sendall(
                    b"POST /raw/stalled-upload HTTP/1.1\r\nHost: example.test\r\n"
                    b"Content-Length: %d\r\n\r\n" % size
                )
                for _ in range(size // MiB):
                    sock.sendall(BLOCK)
                    sent[0] += MiB
            except BaseException as e:
                errors.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            stalled_at = wait_for_stall(lambda: sent[0], "the client's upload")
            print(f"client upload stalled at {stalled_at / MiB:.0f} MiB")
            assert stalled_at < size // 2, f"the proxy took {stalled_at} B the backend never read"
            peak = proxy_rss_kib(proxy)
            assert peak < RSS_LIMIT_KIB, f"proxy peak RSS {peak} KiB while the backend stalled"
        finally:
            raw.release.set()
        sender.join(60)
        assert not sender.is_alive() and errors == []
        resp = ResponseReader(sock).read(timeout=30)
    assert json.loads(resp.body)["count"] == size
    assert raw.uploads[uploads_before][0] == size


def test_unread_response_is_not_buffered(proxy: ProxyProcess, raw: RawBackend) -> None:
    """Flow control downstream: a client that stops reading a 200 MiB answer. The proxy must
    stop reading the backend (whose sends then block) instead of buffering the rest; when the
    client reads again, every byte arrives, in order."""
    size = 200 * MiB
    reset_peak_rss(proxy)
    sent_before = raw.sent
    with connect(proxy) as sock:
        sock.sendall(get(f"/raw/big/{size}"))
        raw.wait_for(lambda: raw.sent - sent_before >= MiB, "first MiB sent")
        stalled_at = wait_for_stall(lambda: raw.sent - sent_before, "the backend's sending")
        print(f"backend download stalled at {stalled_at / MiB:.0f} MiB")
        assert stalled_at < size // 2, f"the proxy read {stalled_at} B the client never took"
        peak = proxy_rss_kib(proxy)
        assert peak < RSS_LIMIT_KIB, f"proxy peak RSS {peak} KiB while the client did not read"
        # the head, then the body checked piece by piece against the pattern
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            assert data, f"closed before the end of the response head: {buf[:200]!r}"
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"content-length: %d" % size in head.lower()
        assert recv_pattern(sock, rest, size, timeout=60) == size


# -- timeouts ----------------------------------------------------------------------------------


def test_header_timeout_half_a_head(timeout_proxy: ProxyProcess, backend: RecordingBackend) -> None:
    raw_before = backend.raw_bytes
    with connect(timeout_proxy) as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET /half HTTP/1.1\r\nHost: example.test\r\nX-Half: ")
        reader = ResponseReader(sock)
        resp = reader.read(timeout=T)
        answered = time.monotonic() - t0
        assert resp.status == 408
        assert_closed(sock, reader)
    assert 0.9 <= answered <= 2.5, f"408 after {answered:.2f}s with header_timeout 1s"
    assert backend.raw_bytes == raw_before


def test_header_timeout_is_not_reset_by_a_trickle(timeout_proxy: ProxyProcess) -> None:
    """Slowloris: a byte every 100 ms keeps the connection busy but the head never completes;
    the deadline runs from the head's first byte."""
    with connect(timeout_proxy) as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET /trickle HTTP/1.1\r\nHost: example.test\r\nX-Slow: ")
        answered = None
        while time.monotonic() - t0 < 4:
            if select.select([sock], [], [], 0.1)[0]:
                answered = time.monotonic() - t0
                break
            with contextlib.suppress(OSError):
                sock.sendall(b"a")
        assert answered is not None, "no answer to a head trickled for 4 s"
        reader = ResponseReader(sock)
        assert reader.read(timeout=T).status == 408
    assert answered <= 2.5, f"408 only after {answered:.2f}s with header_timeout 1s"


def test_connection_that_sends_nothing_is_closed(timeout_proxy: ProxyProcess) -> None:
    with connect(timeout_proxy) as sock:
        t0 = time.monotonic()
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while data := _recv_until(sock, t0 + 4):
                got += data
        closed = time.monotonic() - t0
    assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert 0.9 <= closed <= 2.5, f"silent connection closed after {closed:.2f}s (timeouts 1s)"


def _recv_until(sock: socket.socket, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise AssertionError("connection still open at the deadline")
    sock.settimeout(remaining)
    try:
        return sock.recv(65536)
    except TimeoutError:
        raise AssertionError("connection still open at the deadline") from None


def test_idle_keep_alive_timeout(timeout_proxy: ProxyProcess) -> None:
    with connect(timeout_proxy) as sock:
        sock.sendall(get("/before-idle"))
        reader = ResponseReader(sock)
        assert echoed(reader.read(timeout=T))["target"] == "/before-idle"
        t0 = time.monotonic()
        closed = assert_closed(sock, reader, timeout=4)
    idle = closed - t0
    assert 0.9 <= idle <= 2.5, f"idle connection closed after {idle:.2f}s with idle_timeout 1s"


def test_busy_connection_outlives_the_idle_timeout(timeout_proxy: ProxyProcess) -> None:
    """The idle timer must not cut an exchange in progress: a 1.5 s backend answer."""
    with connect(timeout_proxy) as sock:
        sock.sendall(get("/delay/1.5"))
        reader = ResponseReader(sock)
        assert echoed(reader.read(timeout=T))["target"] == "/delay/1.5"


# -- headers, concurrency ----------------------------------------------------------------------


def test_large_response_headers(proxy: ProxyProcess) -> None:
    with connect(proxy) as sock:
        sock.sendall(get("/big-headers"))
        resp = ResponseReader(sock).read(timeout=T)
    assert resp.status == 200 and resp.body == b"big headers"
    assert resp.header("x-big") == BIG_HEADER
    got = [(k.lower(), v) for k, v in resp.headers if k.lower().startswith("x-many-")]
    assert got == [(k.lower(), v) for k, v in MANY_HEADERS]


def test_many_concurrent_connections(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    clients, per_client = 200, 20
    conns_before = backend.connections_accepted

    async def client(i: int) -> list[str]:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        seen = []
        try:
            for j in range(per_client):
                writer.write(get(f"/cc/{i}/{j}"))
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                assert m, head
                body = await reader.readexactly(int(m.group(1)))
                assert head.startswith(b"HTTP/1.1 200 "), head[:100] + body
                seen.append(json.loads(body)["target"])
        finally:
            writer.close()
        return seen

    async def main() -> list[list[str]]:
        return await asyncio.wait_for(
            asyncio.gather(*(client(i) for i in range(clients))), timeout=60
        )

    results = asyncio.run(main())
    for i, seen in enumerate(results):
        assert seen == [f"/cc/{i}/{j}" for j in range(per_client)]
    # pooling: 4000 requests over at most max_connections upstream connections
    assert backend.connections_accepted - conns_before <= 64
    assert proxy.alive()
