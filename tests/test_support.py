"""Self-tests of the test harness (tests/support), driven by an independent client.

The e2e tests trust these servers to report faithfully what reached them; these tests earn
that trust by talking to them directly with ``requests`` and raw sockets — no proxy involved.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Literal

import pytest
import requests

from support import loopback_guard
from support.backend import (
    HungServer,
    Recorded,
    RecordingBackend,
    Reply,
    dead_port,
    pattern_bytes,
)
from support.metrics import Scrape, fetch_text
from support.procfs import alive, connected_to, established_from, socket_inodes, tcp_sockets
from support.proxy import ProxyProcess, raw_request, read_http_response
from support.servers import LoopThread, ServerThread, SocketServer
from support.wait import wait_until

T = 5.0  # client timeout for every request in this file


def test_echo_records_request_as_received(backend: RecordingBackend) -> None:
    r = requests.get(f"{backend.url}/a/b?x=1&y=2", headers={"X-Mixed-Case": "v1"}, timeout=T)
    assert r.status_code == 200
    echoed = r.json()
    assert echoed["method"] == "GET"
    assert echoed["target"] == "/a/b?x=1&y=2"
    assert ["X-Mixed-Case", "v1"] in echoed["headers"]
    (rec,) = backend.wait_for_requests(1)
    assert rec.method == "GET"
    assert rec.path == "/a/b" and rec.query == "x=1&y=2"
    assert ("X-Mixed-Case", "v1") in rec.headers  # original case kept
    assert rec.header("x-mixed-case") == "v1"
    assert rec.http_version == "1.1"
    assert rec.body == b""


def test_content_length_and_chunked_bodies(backend: RecordingBackend) -> None:
    r = requests.post(f"{backend.url}/cl", data=b"hello world", timeout=T)
    assert r.json()["body"] == "hello world"

    def gen() -> Iterator[bytes]:
        yield b"part1-"
        yield b"part2-"
        yield b"end"

    r = requests.post(f"{backend.url}/chunked-up", data=gen(), timeout=T)
    assert r.json()["body_len"] == len(b"part1-part2-end")
    first, second = backend.wait_for_requests(2)
    assert first.body == b"hello world" and first.header("content-length") == "11"
    assert second.body == b"part1-part2-end"
    assert second.header("transfer-encoding") == "chunked"


def test_keep_alive_reuses_one_connection(backend: RecordingBackend) -> None:
    with requests.Session() as s:
        for i in range(5):
            assert s.get(f"{backend.url}/{i}", timeout=T).status_code == 200
    recs = backend.wait_for_requests(5)
    assert backend.connections_accepted == 1
    assert {r.connection_id for r in recs} == {1}


def test_status_bytes_chunked_head_paths(backend: RecordingBackend) -> None:
    r = requests.get(f"{backend.url}/status/418", timeout=T)
    assert r.status_code == 418 and r.json()["target"] == "/status/418"
    r = requests.get(f"{backend.url}/status/204", timeout=T)
    assert r.status_code == 204 and r.content == b""
    r = requests.get(f"{backend.url}/bytes/300000", timeout=T)
    assert r.content == pattern_bytes(300000)
    r = requests.get(f"{backend.url}/chunked/3", timeout=T)
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert r.content == b"chunk-0\nchunk-1\nchunk-2\n"
    r = requests.head(f"{backend.url}/bytes/1234", timeout=T)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["Content-Length"] == "1234"


def test_delay_path_delays(backend: RecordingBackend) -> None:
    start = time.monotonic()
    r = requests.get(f"{backend.url}/delay/0.3", timeout=T)
    assert r.status_code == 200
    assert time.monotonic() - start >= 0.3


def test_reset_mid_body_truncates_and_resets(backend: RecordingBackend) -> None:
    sock = socket.create_connection(("127.0.0.1", backend.port), timeout=T)
    with sock:
        sock.sendall(b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Content-Length: 16384" in head
    assert 0 < len(body) <= 8192  # promised 16384, then RST


def test_hang_never_answers_and_stop_is_bounded() -> None:
    b = RecordingBackend().start()
    try:
        with pytest.raises(requests.ReadTimeout):
            requests.get(f"{b.url}/hang", timeout=(T, 0.3))
        assert b.wait_for_requests(1)[0].path == "/hang"
    finally:
        start = time.monotonic()
        b.stop(timeout=5)
        assert time.monotonic() - start < 5


def test_hang_notices_client_close(backend: RecordingBackend) -> None:
    sock = socket.create_connection(("127.0.0.1", backend.port), timeout=T)
    sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    backend.wait_for_requests(1)
    assert backend.open_connections == 1
    sock.close()
    backend.wait_for(lambda b: b.open_connections == 0, timeout=T)


def test_handler_replies_and_actions() -> None:
    def handler(req: Recorded) -> Reply:
        if req.path == "/close":
            return Reply(action="close")
        if req.path == "/boom":
            raise ValueError("boom")
        return Reply(status=201, headers=[("X-From", "handler")], body=[b"a", b"bc"])

    with RecordingBackend(handler) as b:
        r = requests.get(f"{b.url}/x", timeout=T)
        assert (r.status_code, r.headers["X-From"], r.content) == (201, "handler", b"abc")
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{b.url}/close", timeout=T)
        r = requests.get(f"{b.url}/boom", timeout=T)
        assert r.status_code == 500 and b"boom" in r.content


def test_raw_bytes_counts_unparseable_input(backend: RecordingBackend) -> None:
    data = b"NOT HTTP AT ALL\r\n\r\n"
    out = raw_request(backend.port, data, timeout=T)
    assert out.startswith(b"HTTP/1.1 400")
    backend.wait_for(lambda b: b.raw_bytes == len(data), timeout=T)
    assert backend.requests == []


def test_pipelined_requests_answered_in_order(backend: RecordingBackend) -> None:
    with socket.create_connection(("127.0.0.1", backend.port), timeout=T) as sock:
        sock.sendall(
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /chunked/2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        first = read_http_response(sock)
        head = read_http_response(sock, method="HEAD")
        chunked = read_http_response(sock)
        last = read_http_response(sock)
    assert json.loads(first.body)["target"] == "/one"
    assert head.header("content-length") == "10" and head.body == b""
    assert chunked.body == b"chunk-0\nchunk-1\n"
    assert json.loads(last.body)["target"] == "/two"
    assert last.header("connection") == "close"


def test_expect_100_continue(backend: RecordingBackend) -> None:
    with socket.create_connection(("127.0.0.1", backend.port), timeout=T) as sock:
        sock.sendall(
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = read_http_response(sock, skip_interim=False)
        assert interim.status == 100
        sock.sendall(b"hello")
        final = read_http_response(sock)
    assert final.status == 200 and json.loads(final.body)["body"] == "hello"


def test_http10_close_delimited(backend: RecordingBackend) -> None:
    out = raw_request(backend.port, b"GET /chunked/2 HTTP/1.0\r\n\r\n", timeout=T)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()  # an HTTP/1.0 client cannot read chunked
    assert body == b"chunk-0\nchunk-1\n"


def test_wait_for_requests_is_bounded(backend: RecordingBackend) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        backend.wait_for_requests(1, timeout=0.2)
    assert time.monotonic() - start < 2


def test_hung_server_accepts_and_never_answers() -> None:
    with HungServer() as hung:
        with pytest.raises(requests.ReadTimeout):
            requests.get(hung.url, timeout=(T, 0.3))
        hung.wait_for_connections(1)
        assert hung.connections_accepted == 1


def test_hung_server_counts_clients_established() -> None:
    with HungServer() as hung:
        clients = [socket.create_connection(("127.0.0.1", hung.port), timeout=T) for _ in range(3)]
        try:
            hung.wait_for_connections(3)
            # wait_until: a read of /proc/net/tcp may skip a row while other sockets come and go
            wait_until(lambda: hung.clients_established() == 3, T, "3 clients established")
            clients[1].close()  # the client's side leaves ESTABLISHED at once (FIN_WAIT)
            wait_until(lambda: hung.clients_established() == 2, T, "2 clients established")
        finally:
            for c in clients:
                c.close()


def _tcp_row(sl: int, local: str, remote: str, state: str, inode: int) -> str:
    return (
        f"{sl:4d}: {local} {remote} {state} 00000000:00000000 00:00000000 00000000"
        f"  1000        0 {inode} 1 0000000000000000 20 4 30 10 -1"
    )


def test_established_from_counts_each_connection_once() -> None:
    """A read of /proc/net/tcp in pieces while sockets come and go repeats rows (seen on a busy
    machine: 10 rows for 8 connections, two of them twice); each connection counts once."""
    server, other = "0100007F:8783", "0100007F:1F90"
    rows = [
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid",
        _tcp_row(0, server, "00000000:0000", "0A", 10),  # the listener
        _tcp_row(1, "0100007F:A51E", server, "01", 11),
        _tcp_row(2, "0100007F:A526", server, "01", 12),
        _tcp_row(3, server, "0100007F:A51E", "01", 13),  # the server's side of 11
        _tcp_row(4, "0100007F:A52E", server, "04", 14),  # closed by the client: FIN_WAIT2
        _tcp_row(5, "0100007F:A53A", other, "01", 15),  # to another server
        _tcp_row(6, "0100007F:A542", server, "01", 16),  # not asked about (accepted later)
        _tcp_row(7, "0100007F:A51E", server, "01", 11),  # rows 1 and 2 again
        _tcp_row(8, "0100007F:A526", server, "01", 12),
    ]
    table = "\n".join(rows) + "\n"
    asked = [0xA51E, 0xA526, 0xA52E, 0xA53A]
    assert established_from(asked, 0x8783, table) == 2
    assert established_from([*asked, 0xA542], 0x8783, table) == 3
    assert established_from(asked, 0x1F90, table) == 1
    assert established_from([], 0x8783, table) == 0


def test_scrape_queries_samples_by_name_and_a_subset_of_labels() -> None:
    """The parser behind every metrics assertion: label subsets sum, escapes are undone,
    the full sample name is what counts (``_total``, not the family name)."""
    text = "\n".join(
        [
            "# HELP shadowlane_shadow_requests_total Shadow copies.",
            "# TYPE shadowlane_shadow_requests_total counter",
            'shadowlane_shadow_requests_total{route="api",target="s",outcome="ok"} 3.0',
            'shadowlane_shadow_requests_total{route="api",target="s",outcome="error"} 1.0',
            'shadowlane_shadow_requests_total{route="api",target="t",outcome="ok"} 5.0',
            'shadowlane_shadow_requests_total{route="a\\"q",target="s",outcome="ok"} 7.0',
            "# TYPE shadowlane_build_info gauge",
            'shadowlane_build_info{version="0.1.0"} 1.0',
            "",
        ]
    )
    m = Scrape(text)
    name = "shadowlane_shadow_requests_total"
    assert m.sum(name) == 16
    assert m.sum(name, route="api") == 9
    assert m.sum(name, route="api", target="s", outcome="ok") == 3
    assert m.sum(name, route="nope") == 0
    assert m.sum("shadowlane_shadow_requests") == 0
    assert m.by("target", name, route="api") == {"s": 4, "t": 5}
    assert m.outcomes("api", "s") == {"ok": 3, "error": 1}
    assert m.outcomes('a"q', "s") == {"ok": 7}
    assert [s.labels for s in m.select("shadowlane_build_info")] == [{"version": "0.1.0"}]


def test_fetch_text_fails_on_a_non_200_answer() -> None:
    with RecordingBackend(lambda _req: Reply(status=503, body=b"draining")) as b:
        with pytest.raises(AssertionError, match="503"):
            fetch_text(b.url)
        assert [r.target for r in b.requests] == ["/metrics"]


def test_tcp_sockets_finds_listeners_and_connections_by_inode() -> None:
    """What tests use to tell which process owns a socket: the inodes /proc/net/tcp lists
    for a port are the ones this process holds (a bound, non-listening socket is not there)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        mine = socket_inodes(os.getpid())
        assert tcp_sockets(port, listening=True, reads=3) <= mine
        assert len(tcp_sockets(port, listening=True, reads=3)) == 1
        with socket.create_connection(("127.0.0.1", port), timeout=T):
            accepted, _ = server.accept()
            with accepted:
                connected = wait_until(
                    lambda: tcp_sockets(port, listening=False), T, "the connection"
                )
                assert connected <= socket_inodes(os.getpid())
                assert connected_to([os.getpid()], port) == {os.getpid(): True}
    assert tcp_sockets(dead_port(), listening=True, reads=3) == set()


class _Echo(SocketServer):
    """Echoes what it reads, one blocking recv at a time, until the peer or stop() ends it."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = threading.Event()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            while chunk := conn.recv(65536):
                conn.sendall(chunk)
        self.ended.set()


def test_socket_server_stop_wakes_a_handler_blocked_in_recv() -> None:
    server = _Echo()
    port = server.port  # bound before start
    with server, socket.create_connection(("127.0.0.1", port), timeout=T) as client:
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"
        start = time.monotonic()
        server.stop()
        assert server.ended.is_set(), "the handler thread was not joined"
        assert time.monotonic() - start < 2
        assert client.recv(1) == b""  # our side sees the server's shutdown
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=T).close()


def test_server_thread_start_raises_what_stopped_it() -> None:
    class Broken(ServerThread):
        def _run(self) -> None:
            raise OSError("cannot bind")

    with pytest.raises(OSError, match="cannot bind"):
        Broken().start()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_loop_thread_runs_coroutines_off_the_test_thread(
    kind: Literal["asyncio", "uvloop"],
) -> None:
    async def where() -> int | None:
        await asyncio.sleep(0)
        return threading.get_ident()

    with LoopThread(kind) as lt:
        assert lt.run(where()) == lt.ident != threading.get_ident()
    assert lt.loop.is_closed()


def test_dead_port_refuses() -> None:
    port = dead_port()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=T)


def test_concurrent_clients(backend: RecordingBackend) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            r = requests.post(f"{backend.url}/c/{i}", data=pattern_bytes(10000 + i), timeout=T)
            assert r.json()["body_len"] == 10000 + i
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert not errors
    recs = backend.wait_for_requests(20)
    assert sorted(len(r.body) for r in recs) == [10000 + i for i in range(20)]


def test_wait_until() -> None:
    assert wait_until(lambda: 42, timeout=1, what="x") == 42
    with pytest.raises(TimeoutError, match="never"):
        wait_until(lambda: False, timeout=0.1, what="never")


def test_proxy_process_fills_ports_and_reports_startup_failure() -> None:
    """A config the proxy must reject: ProxyProcess raises with the proxy's stderr in it."""
    proxy = ProxyProcess({"no_such_key": 1}, ready_timeout=15)
    try:
        assert proxy.config["listen"] == "127.0.0.1:0"
        assert proxy.config["admin"]["listen"] == "127.0.0.1:0"
        with pytest.raises(RuntimeError, match="no_such_key"):
            proxy.start()
        assert proxy.returncode not in (None, 0)
    finally:
        proxy.close()


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        (b"localhost", True),
        ("LOCALHOST.", True),
        ("foo.localhost", True),
        (None, True),
        ("10.255.255.1", False),
        ("192.0.2.1", False),
        ("::ffff:10.0.0.1", False),
        ("httpbin.org", False),
        ("doesnotexist.google.com", False),
        ("localhost.evil.com", False),
    ],
)
def test_loopback_guard_decides(host: object, allowed: bool) -> None:
    assert loopback_guard.is_loopback_host(host) is allowed


def test_loopback_guard_blocks_and_uninstalls(backend: RecordingBackend) -> None:
    """Only numeric names here: even a broken guard could not send anything for them."""
    uninstall = loopback_guard.install()
    try:
        with pytest.raises(socket.gaierror, match="loopback_guard"):
            socket.getaddrinfo("192.0.2.1", 80)
        # loopback keeps working, through the patched connect
        assert requests.get(f"{backend.url}/ok", timeout=T).status_code == 200
    finally:
        uninstall()
    assert socket.getaddrinfo("192.0.2.1", 80)  # restored: numeric, resolved locally


_RUNNER = """
import subprocess, sys, time
from support.processes import ends_with_us
armed = sys.argv[1] == "1"
server = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(60)"],
    start_new_session=True,
    preexec_fn=ends_with_us() if armed else None,
)
print(server.pid, flush=True)
time.sleep(60)
"""


def _sigkill_pending(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        masks = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd", "ShdPnd"))]
    return any(m & (1 << (9 - 1)) for m in masks)


@pytest.mark.parametrize("armed", [True, False])
def test_servers_end_with_the_test_process(armed: bool) -> None:
    """A server started with `ends_with_us` (its own session, so a signal to the test run's
    group misses it) is killed by the kernel when the process that started it dies by
    SIGKILL; without it, the server outlives it (the control: it is then stopped by PID)."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    runner = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, "1" if armed else "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": tests_dir},
        start_new_session=True,
    )
    assert runner.stdout is not None
    server = int(runner.stdout.readline())
    try:
        assert alive(server)
        runner.kill()
        runner.wait(10)
        if armed:
            wait_until(lambda: not alive(server), 10, "the server to end with its parent")
        else:
            # the control: the kernel signals at the parent's exit, before wait() can reap it,
            # so a SIGKILL sent would now be pending or done: neither, the server runs on
            assert alive(server)
            assert not _sigkill_pending(server)
    finally:
        if alive(server):
            os.kill(server, 9)
