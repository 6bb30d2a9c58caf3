"""Bad and ambiguous requests never reach a backend (issue 2, "Bad and ambiguous requests").

Every test sends raw bytes to a real proxy process in front of a real :class:`RecordingBackend`
and checks three things:

1. the proxy answers the expected 4xx/5xx itself,
2. it closes the connection after that answer (the rest of the bytes cannot be trusted as the
   start of a next request), and
3. the backend received nothing: no request recorded, not one byte, no new connection.

Point 3 is proven with a *sentinel*: after the bad exchange, a known-good request goes through
the same proxy and the test waits until the backend has it. The backend must then have received
exactly the sentinel's bytes since the snapshot taken before the bad request, and no connection
besides the one the sentinel used. So a proxy that forwards a bad request a little late, or only
opens an upstream connection for it, still fails.

One proxy and one backend serve the whole module: these exchanges share no state but the
backend's counters, which each test snapshots.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from support import bad_requests as cases
from support.backend import Recorded, RecordingBackend
from support.bad_requests import MAX_HEADER, head
from support.proxy import HttpResponse, ProxyProcess, ResponseReader, basic_config

T = 5.0  # bound on every read in this file
SMALL_MAX_BODY = 1024  # max_body of the /small route
SENTINEL = b"GET /__sentinel HTTP/1.1\r\nHost: sentinel.test\r\n\r\n"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    with RecordingBackend() as b:
        yield b
    assert b.errors == [], f"RecordingBackend raised: {b.errors!r}"


@pytest.fixture(scope="module")
def proxy(backend: RecordingBackend, request: pytest.FixtureRequest) -> Iterator[ProxyProcess]:
    config = basic_config(backend.url)
    config["routes"].insert(
        0,
        {
            "name": "small",
            "match": {"path_prefix": "/small"},
            "backend": "b1",
            "max_body": f"{SMALL_MAX_BODY}B",
        },
    )
    config["limits"] = {"max_header_size": f"{MAX_HEADER}B"}
    failed_before = request.session.testsfailed
    with ProxyProcess(config) as p:
        yield p
        if request.session.testsfailed > failed_before:
            print(f"--- proxy pid {p.pid} stderr ---\n{p.stderr_text()}")


@dataclass(frozen=True)
class Snapshot:
    raw_bytes: int
    connections: int
    requests: int


@pytest.fixture(scope="module")
def sentinel_size(proxy: ProxyProcess, backend: RecordingBackend) -> int:
    """How many bytes the backend receives for one forwarded SENTINEL (constant per run: the
    proxy adds fixed-length headers). Measured on a warm upstream connection."""
    _send_sentinel(proxy, backend)
    before = _snapshot(backend)
    _send_sentinel(proxy, backend)
    size = backend.raw_bytes - before.raw_bytes
    assert size > len(SENTINEL) // 2
    return size


# -- helpers -----------------------------------------------------------------------------------


def _snapshot(backend: RecordingBackend) -> Snapshot:
    return Snapshot(backend.raw_bytes, backend.connections_accepted, len(backend.requests))


def _send_sentinel(proxy: ProxyProcess, backend: RecordingBackend) -> Recorded:
    n = len(backend.requests)
    with socket.create_connection((proxy.host, proxy.port), timeout=T) as sock:
        sock.sendall(SENTINEL)
        resp = ResponseReader(sock).read(timeout=T)
    assert resp.status == 200, f"sentinel failed: {resp.status} {resp.body[:200]!r}"
    recs = backend.wait_for_requests(n + 1, timeout=T)
    assert recs[-1].path == "/__sentinel"
    return recs[-1]


def assert_backend_got_nothing_since(
    before: Snapshot, proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    """The sentinel barrier: after it arrived, the backend must hold exactly it since ``before``."""
    sentinel = _send_sentinel(proxy, backend)
    new = backend.requests[before.requests :]
    assert [r.target for r in new] == ["/__sentinel"], f"backend received {new!r}"
    assert backend.raw_bytes - before.raw_bytes == sentinel_size, (
        "backend received bytes besides the sentinel's"
    )
    sentinel_opened = 1 if sentinel.connection_id > before.connections else 0
    assert backend.connections_accepted - before.connections == sentinel_opened, (
        "proxy opened an upstream connection for the bad request"
    )


def read_until_closed(sock: socket.socket, reader: ResponseReader, timeout: float = T) -> bytes:
    """Everything after the response until the peer closes; fails if it stays open."""
    leftover = bytearray(reader.buf)
    reader.buf.clear()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"proxy kept the connection open after the error ({timeout}s)")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(leftover)  # a reset is a close too
        except TimeoutError:
            continue
        if not chunk:
            return bytes(leftover)
        leftover += chunk


def exchange(proxy: ProxyProcess, data: bytes) -> tuple[HttpResponse, bytes]:
    """Send ``data`` in one write; return the answer and what followed it before the close."""
    with socket.create_connection((proxy.host, proxy.port), timeout=T) as sock:
        sock.sendall(data)
        reader = ResponseReader(sock)
        resp = reader.read(timeout=T)
        return resp, read_until_closed(sock, reader)


def check_rejected(
    proxy: ProxyProcess,
    backend: RecordingBackend,
    sentinel_size: int,
    data: bytes,
    status: int | tuple[int, ...] = 400,
) -> HttpResponse:
    statuses = (status,) if isinstance(status, int) else status
    before = _snapshot(backend)
    resp, after = exchange(proxy, data)
    assert resp.status in statuses, f"want {statuses}, got {resp.status}: {resp.body[:200]!r}"
    assert after == b"", f"bytes after the error answer: {after[:200]!r}"
    assert_backend_got_nothing_since(before, proxy, backend, sentinel_size)
    return resp


# -- framing: Content-Length and Transfer-Encoding ---------------------------------------------


def test_content_length_and_transfer_encoding_together(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    # The classic request-smuggling shape (CL.TE / TE.CL): two framings, two possible bodies.
    lines, body = cases.LENGTH_AND_CHUNKED["cl-then-te"]
    check_rejected(proxy, backend, sentinel_size, head(*lines) + body)


def test_transfer_encoding_then_content_length(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    lines, body = cases.LENGTH_AND_CHUNKED["te-then-cl"]
    check_rejected(proxy, backend, sentinel_size, head(*lines) + body)


@pytest.mark.parametrize(
    "values", cases.TWO_CONTENT_LENGTHS.values(), ids=cases.TWO_CONTENT_LENGTHS.keys()
)
def test_two_content_length_headers(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, values: tuple[str, str]
) -> None:
    data = head(*(f"Content-Length: {v}" for v in values)) + b"abcd"
    check_rejected(proxy, backend, sentinel_size, data)


@pytest.mark.parametrize(
    "value",
    cases.MALFORMED_CONTENT_LENGTHS.values(),
    ids=cases.MALFORMED_CONTENT_LENGTHS.keys(),
)
def test_malformed_content_length(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, value: str
) -> None:
    data = head(f"Content-Length: {value}") + b"abc"
    check_rejected(proxy, backend, sentinel_size, data)


@pytest.mark.parametrize(
    "lines",
    cases.TRANSFER_ENCODING_NOT_CHUNKED.values(),
    ids=cases.TRANSFER_ENCODING_NOT_CHUNKED.keys(),
)
def test_transfer_encoding_not_exactly_chunked(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, lines: list[str]
) -> None:
    # 400 rather than 501: the proxy cannot frame the body, so nothing after the head is safe.
    data = head(*lines) + cases.CHUNKED_BODY
    check_rejected(proxy, backend, sentinel_size, data)


@pytest.mark.parametrize("body", cases.BAD_CHUNKS.values(), ids=cases.BAD_CHUNKS.keys())
def test_bad_chunk(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, body: bytes
) -> None:
    check_rejected(proxy, backend, sentinel_size, head("Transfer-Encoding: chunked") + body)


def test_bad_second_chunk_after_a_good_one(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    # The first chunk is fine (the proxy may start forwarding once it parsed), the second size is
    # junk. Sent in one write, nothing may leave the proxy.
    body = cases.BAD_SECOND_CHUNK
    check_rejected(proxy, backend, sentinel_size, head("Transfer-Encoding: chunked") + body)


# -- head syntax -------------------------------------------------------------------------------


@pytest.mark.parametrize("fold", cases.LINE_FOLDS.values(), ids=cases.LINE_FOLDS.keys())
def test_obsolete_line_folding(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, fold: str
) -> None:
    data = head("X-Folded: first", f"{fold}continued", method="GET")
    check_rejected(proxy, backend, sentinel_size, data)


@pytest.mark.parametrize(
    "data",
    cases.BARE_CR_OR_LF_IN_REQUEST_LINE.values(),
    ids=cases.BARE_CR_OR_LF_IN_REQUEST_LINE.keys(),
)
def test_bare_cr_or_lf_in_request_line(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, data: bytes
) -> None:
    check_rejected(proxy, backend, sentinel_size, data)


@pytest.mark.parametrize(
    "data", cases.BARE_CR_OR_LF_IN_HEADERS.values(), ids=cases.BARE_CR_OR_LF_IN_HEADERS.keys()
)
def test_bare_cr_or_lf_in_headers(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, data: bytes
) -> None:
    check_rejected(proxy, backend, sentinel_size, data)


def test_nul_in_header_value(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    check_rejected(proxy, backend, sentinel_size, head(cases.NUL_IN_HEADER_VALUE, method="GET"))


@pytest.mark.parametrize(
    "data", cases.WHITESPACE_BEFORE_COLON.values(), ids=cases.WHITESPACE_BEFORE_COLON.keys()
)
def test_whitespace_before_colon(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, data: bytes
) -> None:
    # RFC 9112 5.1: must be rejected, or a lenient backend may read "Host " as Host
    check_rejected(proxy, backend, sentinel_size, data)


def test_space_in_request_target(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    check_rejected(proxy, backend, sentinel_size, head(method="GET", target=cases.SPACE_IN_TARGET))


# -- Host --------------------------------------------------------------------------------------


def test_missing_host_on_http11(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    check_rejected(proxy, backend, sentinel_size, cases.MISSING_HOST)


@pytest.mark.parametrize("second", cases.SECOND_HOSTS.values(), ids=cases.SECOND_HOSTS.keys())
def test_duplicate_host(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, second: str
) -> None:
    data = cases.host_request("example.test", second)
    check_rejected(proxy, backend, sentinel_size, data)


@pytest.mark.parametrize("value", cases.MALFORMED_HOSTS.values(), ids=cases.MALFORMED_HOSTS.keys())
def test_malformed_host(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, value: str
) -> None:
    check_rejected(proxy, backend, sentinel_size, cases.host_request(value))


def test_empty_host_never_reaches_backend_as_two_hosts(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    """`Host:` with an empty value on HTTP/1.1. Either answer is acceptable — refuse it (400,
    nothing forwarded) or forward it with exactly one Host — but never an ambiguous request
    with two Host headers (which the backend would have to refuse or, worse, pick one of)."""
    before = _snapshot(backend)
    resp, _ = _exchange_keepalive(proxy, b"GET /empty-host HTTP/1.1\r\nHost: \r\n\r\n")
    _send_sentinel(proxy, backend)
    forwarded = backend.raw_bytes - before.raw_bytes - sentinel_size
    if forwarded == 0:
        assert resp.status == 400  # refused by the proxy itself
        return
    recs = [r for r in backend.requests[before.requests :] if r.path == "/empty-host"]
    assert recs, (
        f"the proxy forwarded {forwarded} bytes that the backend could not accept as a request; "
        f"it answered {resp.status}: {resp.body[:200]!r}"
    )
    assert len(recs[0].header_values("host")) == 1, f"backend got {recs[0].headers!r}"
    assert resp.status == 200


def _exchange_keepalive(proxy: ProxyProcess, data: bytes) -> tuple[HttpResponse, bytes]:
    with socket.create_connection((proxy.host, proxy.port), timeout=T) as sock:
        sock.sendall(data)
        reader = ResponseReader(sock)
        return reader.read(timeout=T), bytes(reader.buf)


# -- version, method ---------------------------------------------------------------------------


def test_http_2_0_request_line(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    resp = check_rejected(proxy, backend, sentinel_size, cases.HTTP_2_0, 505)
    assert resp.reason == "HTTP Version Not Supported"


@pytest.mark.parametrize("version", cases.UNKNOWN_VERSIONS)
def test_unknown_http_version(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, version: str
) -> None:
    """docs/http.md: versions other than 1.0 and 1.1 get 505. (RFC 9110 2.5 would let a server
    treat HTTP/1.2 as 1.1; an ingress should not guess what an unknown version means.)"""
    data = cases.unknown_version_request(version)
    resp = check_rejected(proxy, backend, sentinel_size, data, (400, 505))
    assert resp.status == 505, f"refused, but with {resp.status} {resp.body!r}"


def test_http_0_9_simple_request(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    check_rejected(proxy, backend, sentinel_size, cases.HTTP_0_9_SIMPLE, (400, 505))


def test_version_not_one_digit_dot_one_digit(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    # HTTP-version = "HTTP/" DIGIT "." DIGIT: `HTTP/1.10` is a malformed request line
    check_rejected(proxy, backend, sentinel_size, cases.VERSION_TWO_DIGITS)


@pytest.mark.parametrize("data", cases.CONNECTS.values(), ids=cases.CONNECTS.keys())
def test_connect_not_implemented(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int, data: bytes
) -> None:
    check_rejected(proxy, backend, sentinel_size, data, 501)


def test_lowercase_method(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    # methods are case-sensitive (RFC 9110 9.1): `get` is not GET
    check_rejected(proxy, backend, sentinel_size, cases.LOWERCASE_METHOD)


def test_unsupported_expectation(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    data = head(cases.UNSUPPORTED_EXPECTATION, method="GET")
    check_rejected(proxy, backend, sentinel_size, data, 417)


# -- header size limit (limits.max_header_size = MAX_HEADER) -----------------------------------


def test_one_huge_header(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    data = head(cases.ONE_HUGE_HEADER, method="GET")
    check_rejected(proxy, backend, sentinel_size, data, 431)


def test_many_headers(proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int) -> None:
    lines = cases.MANY_HEADERS
    assert sum(len(line) + 2 for line in lines) > MAX_HEADER
    check_rejected(proxy, backend, sentinel_size, head(*lines, method="GET"), 431)


def test_head_just_under_the_limit_passes(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    """The other side of the 431 tests: the limit is not simply 'any header at all'."""
    data = head(cases.JUST_UNDER_THE_LIMIT, method="GET", target="/under")
    resp, _ = _exchange_keepalive(proxy, data)
    assert resp.status == 200, resp.body[:200]
    rec = backend.wait_for_requests(1)[-1]
    assert rec.path == "/under" and rec.header("x-big") == "a" * (MAX_HEADER // 2)


def _trickle_until_answered(
    proxy: ProxyProcess, pieces: Iterator[bytes], pause: float = 0.005
) -> tuple[HttpResponse, bytes, int]:
    """Send ``pieces`` one segment at a time until the proxy answers (or they run out)."""
    sent = 0
    with socket.create_connection((proxy.host, proxy.port), timeout=T) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            readable, _, _ = select.select([sock], [], [], pause)  # paces segments apart
            if readable:
                break
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(piece)
                sent += len(piece)
        reader = ResponseReader(sock)
        resp = reader.read(timeout=T)
        return resp, read_until_closed(sock, reader), sent


def test_header_too_large_sent_slowly_one_header(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    """A head that never ends, trickled in small segments: the proxy must cut it off once it
    passes the limit, without waiting for the end of the head (which never comes)."""
    before = _snapshot(backend)

    def pieces() -> Iterator[bytes]:
        yield b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Slow: "
        for _ in range(8 * MAX_HEADER // 64):
            yield b"s" * 64

    resp, after, sent = _trickle_until_answered(proxy, pieces())
    assert resp.status == 431
    assert after == b""
    assert sent < 4 * MAX_HEADER, f"proxy let {sent} head bytes in before answering"
    assert_backend_got_nothing_since(before, proxy, backend, sentinel_size)


def test_header_too_large_sent_slowly_many_headers(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    before = _snapshot(backend)

    def pieces() -> Iterator[bytes]:
        yield b"GET / HTTP/1.1\r\nHost: example.test\r\n"
        for i in range(8 * MAX_HEADER // 32):
            yield f"X-H-{i:05d}: {'v' * 18}\r\n".encode()

    resp, after, sent = _trickle_until_answered(proxy, pieces())
    assert resp.status == 431
    assert after == b""
    assert sent < 4 * MAX_HEADER, f"proxy let {sent} head bytes in before answering"
    assert_backend_got_nothing_since(before, proxy, backend, sentinel_size)


# -- body size limit (route /small: max_body = SMALL_MAX_BODY) ---------------------------------


def test_content_length_over_route_max_body(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    # Only the head is sent: the proxy must answer from the Content-Length alone.
    data = head(f"Content-Length: {SMALL_MAX_BODY + 1}", target="/small/upload")
    check_rejected(proxy, backend, sentinel_size, data, 413)


def test_content_length_at_route_max_body_passes(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    body = b"x" * SMALL_MAX_BODY
    data = head(f"Content-Length: {len(body)}", target="/small/exact") + body
    resp, _ = _exchange_keepalive(proxy, data)
    assert resp.status == 200, resp.body[:200]
    rec = backend.wait_for_requests(1)[-1]
    assert rec.path == "/small/exact" and rec.body == body


def test_chunked_body_over_route_max_body(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    """Chunked: the size is only known as it arrives. The backend may have seen the start of the
    upload, but must never have received a complete request."""
    before = _snapshot(backend)
    chunk = b"c" * 400
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    resp, after = exchange(
        proxy, head("Transfer-Encoding: chunked", target="/small/chunked") + body
    )
    assert resp.status == 413
    assert after == b""
    _send_sentinel(proxy, backend)
    new = backend.requests[before.requests :]
    assert [r.target for r in new] == ["/__sentinel"], f"backend completed {new!r}"


def test_chunked_body_over_route_max_body_sent_slowly(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    """Same, but the chunks trickle in, so the proxy has surely started forwarding: it must cut
    the upstream request off, never finish it."""
    before = _snapshot(backend)

    def pieces() -> Iterator[bytes]:
        yield head("Transfer-Encoding: chunked", target="/small/slow")
        for _ in range(3 * SMALL_MAX_BODY // 100):
            yield b"64\r\n" + b"s" * 100 + b"\r\n"
        yield b"0\r\n\r\n"

    resp, after, _ = _trickle_until_answered(proxy, pieces(), pause=0.01)
    assert resp.status == 413
    assert after == b""
    _send_sentinel(proxy, backend)
    new = backend.requests[before.requests :]
    assert [r.target for r in new] == ["/__sentinel"], f"backend completed {new!r}"


# -- a bad request after good ones --------------------------------------------------------------


def test_valid_request_pipelined_before_a_bad_one(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    before = _snapshot(backend)
    good = b"GET /first HTTP/1.1\r\nHost: example.test\r\n\r\n"
    bad = b"POST /second HTTP/1.1\r\nHost: example.test\r\nContent-Length: 1\r\n"
    bad += b"Content-Length: 2\r\n\r\nab"
    with socket.create_connection((proxy.host, proxy.port), timeout=T) as sock:
        sock.sendall(good + bad)
        reader = ResponseReader(sock)
        first = reader.read(timeout=T)
        assert first.status == 200, (
            f"the valid first request was answered {first.status} {first.body[:100]!r}"
        )
        assert b'"target": "/first"' in first.body
        second = reader.read(timeout=T)
        after = read_until_closed(sock, reader)
    assert second.status == 400
    assert after == b""
    _send_sentinel(proxy, backend)
    new = backend.requests[before.requests :]
    assert [r.target for r in new] == ["/first", "/__sentinel"]


def test_two_valid_requests_pipelined_before_a_bad_one(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    before = _snapshot(backend)
    good1 = b"GET /delay/0.2 HTTP/1.1\r\nHost: example.test\r\n\r\n"
    good2 = b"POST /two HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\n\r\nabc"
    bad = b"GET /three HTTP/1.1\r\nHost: example.test\r\nX-A: b\r\n c\r\n\r\n"
    with socket.create_connection((proxy.host, proxy.port), timeout=T) as sock:
        sock.sendall(good1 + good2 + bad)
        reader = ResponseReader(sock)
        statuses = []
        for _ in range(3):
            resp = reader.read(timeout=T)
            statuses.append(resp.status)
            if resp.status != 200:
                break
        after = read_until_closed(sock, reader)
    assert statuses == [200, 200, 400]
    assert after == b""
    _send_sentinel(proxy, backend)
    new = backend.requests[before.requests :]
    assert [r.target for r in new] == ["/delay/0.2", "/two", "/__sentinel"]
    assert new[1].body == b"abc"


def test_bad_request_arriving_while_a_valid_one_is_in_flight(
    proxy: ProxyProcess, backend: RecordingBackend, sentinel_size: int
) -> None:
    """The bad request comes in a later write, while the first one waits on the backend."""
    before = _snapshot(backend)
    with socket.create_connection((proxy.host, proxy.port), timeout=T) as sock:
        sock.sendall(b"GET /delay/0.3 HTTP/1.1\r\nHost: example.test\r\n\r\n")
        backend.wait_for(lambda b: len(b.requests) > before.requests, timeout=T)
        sock.sendall(b"GET /late HTTP/1.1\r\nHost: example.test\r\nHost: other.test\r\n\r\n")
        reader = ResponseReader(sock)
        first = reader.read(timeout=T)
        second = reader.read(timeout=T)
        after = read_until_closed(sock, reader)
    assert (first.status, second.status) == (200, 400)
    assert b'"target": "/delay/0.3"' in first.body
    assert after == b""
    _send_sentinel(proxy, backend)
    new = backend.requests[before.requests :]
    assert [r.target for r in new] == ["/delay/0.3", "/__sentinel"]


@pytest.mark.parametrize(
    "connection",
    [
        b"Connection: close\r\nConnection: keep-alive\r\n",
        b"Connection: keep-alive, Close\r\n",
    ],
    ids=["two-headers", "one-list"],
)
def test_close_beside_keep_alive_in_http_10_closes(
    proxy: ProxyProcess, backend: RecordingBackend, connection: bytes
) -> None:
    """Found by the framing fuzzer against h11: an HTTP/1.0 request naming both `close` and
    `keep-alive` ends its connection (RFC 9112 9.6; llhttp alone kept it open), so a request
    pipelined behind it is never read, let alone forwarded."""
    before = _snapshot(backend)
    first = b"GET /fz/0 HTTP/1.0\r\nContent-Length: 0\r\nHost: h.test\r\n" + connection + b"\r\n"
    second = b"GET /fz/1 HTTP/1.1\r\nContent-Length: 0\r\nHost: h.test\r\n\r\n"
    with socket.create_connection((proxy.host, proxy.port), timeout=T) as sock:
        sock.sendall(first + second)
        reader = ResponseReader(sock)
        resp = reader.read(timeout=T)
        after = read_until_closed(sock, reader)
    assert resp.status == 200
    assert after == b""
    _send_sentinel(proxy, backend)
    new = backend.requests[before.requests :]
    assert [r.target for r in new] == ["/fz/0", "/__sentinel"]
