"""Bodies over a shadow's `max_body` stream to a `stream_body` shadow in step with the primary.

Real servers on 127.0.0.1 and the proxy as a subprocess. The backends hash each body as they
read it (sha256) and answer with the digest, so "the shadow got exactly the body" is what a
backend computed, not what the proxy says it sent. A shadow that stops reading after the head
shows the other side: the copy is `aborted` while the upload still goes, the client's upload
takes about as long as without the shadow, and the proxy's memory does not grow by the body.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from shadowlane.config import ConfigError, parse_config
from support.configs import backend_entry
from support.h2 import H2Backend, H2Reply, H2Request
from support.metrics import outcomes, scrape, settle
from support.procfs import memory
from support.proxy import ProxyProcess
from support.servers import SocketServer
from support.wait import wait_until

MiB = 1 << 20
BIG = 32 * MiB
BODY = os.urandom(BIG)
DIGEST = hashlib.sha256(BODY).hexdigest()
PIECE = 256 * 1024

ProxyFactory = Callable[..., ProxyProcess]


class HashingBackend(SocketServer):
    """Reads each request's body (Content-Length or chunked) whole, hashing it as it goes,
    and answers `200` with `<tag> <sha256 hex> <size>`; keeps every (digest, size) it
    computed."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.tag = name
        self.bodies: list[tuple[str, int]] = []

    def handle(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                length, chunked = 0, False
                while (h := f.readline()) not in (b"\r\n", b""):
                    name, _, value = h.partition(b":")
                    key = name.strip().lower()
                    if key == b"content-length":
                        length = int(value)
                    elif key == b"transfer-encoding":
                        chunked = b"chunked" in value.lower()
                sha, size = hashlib.sha256(), 0
                if chunked:
                    while True:
                        n = int(f.readline().split(b";")[0], 16)
                        if n == 0:
                            while f.readline() not in (b"\r\n", b""):
                                pass
                            break
                        sha.update(f.read(n))
                        size += n
                        f.readline()
                else:
                    left = length
                    while left:
                        data = f.read(min(left, PIECE))
                        if not data:
                            return
                        sha.update(data)
                        left -= len(data)
                        size += len(data)
                digest = sha.hexdigest()
                with self._cond:
                    self.bodies.append((digest, size))
                out = f"{self.tag} {digest} {size}".encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(out), out))
        except OSError:
            return
        finally:
            f.close()


class StalledBackend(SocketServer):
    """Accepts, reads the request head, then reads nothing more (a shadow that fell behind
    for good), holding the connection until the test stops it. A small receive buffer, so
    the kernel does not take megabytes for it."""

    def __init__(self) -> None:
        super().__init__()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        self.heads = 0

    def _on_accept(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        conn.settimeout(5)
        got = b""
        try:
            while b"\r\n\r\n" not in got:
                data = conn.recv(1024)
                if not data:
                    break
                got += data
        except OSError:
            pass
        with self._cond:
            if b"\r\n\r\n" in got:
                self.heads += 1
            self._keep(conn)  # never read again; closed at stop


#: the client's pace. A client across a network, not one on loopback: there the proxy may read
#: megabytes in one turn of its loop, more than a copy may hold while its connection opens
#: (docs/decisions.md), and the backends, threads of this process sharing its GIL, could not
#: both keep up with it on a busy machine
CLIENT_RATE = 48 * MiB
#: the upload's pace to the HTTP/2 shadow (tests/support/h2.py's server is Python, window
#: update by window update)
H2_SHADOW_RATE = 12 * MiB


def upload(
    port: int,
    path: str,
    *,
    chunked: bool = False,
    gate: Callable[[int], None] | None = None,
    rate: float = CLIENT_RATE,
) -> tuple[int, bytes, float]:
    """POST BODY to the proxy in PIECE-sized writes at `rate` bytes/s; `gate(sent)` runs after
    each piece. Returns (status, answer body, seconds from the first byte to the answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.monotonic()
    try:
        conn.putrequest("POST", path)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        else:
            conn.putheader("Content-Length", str(len(BODY)))
        conn.endheaders()
        view = memoryview(BODY)
        sent = 0
        while sent < len(BODY):
            piece = view[sent : sent + PIECE]
            if chunked:
                conn.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
            else:
                conn.send(piece)
            sent += len(piece)
            ahead = sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)  # pacing, not waiting for something to happen
            if gate is not None:
                gate(sent)
        if chunked:
            conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, body, time.monotonic() - t0
    finally:
        conn.close()


def config(shadow: dict[str, Any], **backends: str) -> dict[str, Any]:
    """Route `up` (/up) copied to `shadow`; route `plain` (/plain) to the same primary,
    unshadowed: the baseline an upload is timed against in the same process."""
    return {
        "backends": {name: backend_entry(url) for name, url in backends.items()},
        "routes": [
            {"name": "plain", "match": {"path_prefix": "/plain"}, "backend": "p"},
            {"name": "up", "match": {"path_prefix": "/up"}, "backend": "p", "shadows": [shadow]},
        ],
    }


def h2c_stream_config(primary: str, shadow: str) -> dict[str, Any]:
    """`config` with a `stream_body` copy to an HTTP/2 (h2c) shadow."""
    sc = {"backend": "s", "percent": 100, "max_body": "1MiB", "stream_body": True}
    cfg = config(sc, p=primary, s=shadow)
    cfg["backends"]["s"]["protocol"] = "h2c"
    return cfg


def nonzero(counts: dict[str, float]) -> dict[str, float]:
    """The outcomes that happened (for an assertion's message)."""
    return {k: v for k, v in counts.items() if v}


@pytest.fixture
def primary() -> Any:
    with HashingBackend("primary") as b:
        yield b


@pytest.fixture
def shadow() -> Any:
    with HashingBackend("shadow") as b:
        yield b


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_big_upload_streams_whole_to_the_shadow(
    proxy_factory: ProxyFactory, primary: HashingBackend, shadow: HashingBackend, chunked: bool
) -> None:
    sc = {"backend": "s", "percent": 100, "max_body": "1MiB", "stream_body": True}
    proxy = proxy_factory(config(sc, p=primary.url, s=shadow.url))
    # a small upload first, copied whole as usual
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("POST", "/up", body=b"small")
    assert conn.getresponse().read().startswith(b"primary ")
    conn.close()
    base = settle(proxy, "up", "s", 1, timeout=10)
    assert base.get("ok") == 1, nonzero(base)
    status, answer, _ = upload(proxy.port, "/up", chunked=chunked)
    assert status == 200
    assert answer == f"primary {DIGEST} {BIG}".encode()  # the client gets the primary's answer
    got = settle(proxy, "up", "s", 1, since=base, timeout=30)
    assert got.get("ok") == 1, nonzero(got)
    assert got.get("sent") == 1, nonzero(got)
    small = (hashlib.sha256(b"small").hexdigest(), 5)
    assert primary.bodies == [small, (DIGEST, BIG)]
    assert shadow.bodies == [small, (DIGEST, BIG)]  # exactly the body, hashed by the shadow


def test_big_upload_streams_whole_to_an_h2c_shadow(
    proxy_factory: ProxyFactory, primary: HashingBackend
) -> None:
    """The copy is a stream on the shadow's HTTP/2 connection: DATA frames in the stream's
    and the connection's windows, as the client's bytes come."""

    def small(_req: H2Request) -> H2Reply:
        return H2Reply(200, [(b"content-type", b"text/plain")], b"shadow ok")

    with H2Backend(small) as h2_shadow:
        proxy = proxy_factory(h2c_stream_config(primary.url, h2_shadow.url))
        # a pace the test's pure-Python h2 server keeps up with on a loaded machine: at the
        # full CLIENT_RATE it once fell 4 MiB behind in CI, and a shadow that far behind is
        # aborted by design (the next test)
        status, answer, _ = upload(proxy.port, "/up", rate=H2_SHADOW_RATE)
        assert (status, answer) == (200, f"primary {DIGEST} {BIG}".encode())
        got = settle(proxy, "up", "s", 1, timeout=30)
        assert got.get("ok") == 1, nonzero(got)
        assert got.get("sent") == 1, nonzero(got)
        [req] = h2_shadow.wait_for_requests(1, timeout=30)
        assert req.method == b"POST" and req.path == b"/up"
        assert len(req.body) == BIG
        assert hashlib.sha256(req.body).hexdigest() == DIGEST  # exactly the body, in order
        assert primary.bodies == [(DIGEST, BIG)]


def test_an_h2c_shadow_that_opens_no_window_is_aborted(
    proxy_factory: ProxyFactory, primary: HashingBackend
) -> None:
    """HTTP/2 says "I stopped reading" by not giving window back: the stream's unsent bytes
    pass the copy's bound and the copy is aborted, the client's upload unaffected."""
    with H2Backend(acknowledge=False) as stalled:
        proxy = proxy_factory(h2c_stream_config(primary.url, stalled.url))
        idle = memory(proxy.pid)["VmRSS"]
        status, answer, _ = upload(proxy.port, "/up")
        assert (status, answer) == (200, f"primary {DIGEST} {BIG}".encode())
        got = settle(proxy, "up", "s", 1, timeout=30)
        assert got.get("aborted") == 1, nonzero(got)
        assert stalled.connections == 1  # the copy went out, then fell behind
        grown = memory(proxy.pid)["VmHWM"] - idle
        assert grown < BIG // 2, f"peak RSS grew {grown / MiB:.1f} MiB over idle"
        assert primary.bodies == [(DIGEST, BIG)]


def test_without_stream_body_a_big_upload_is_still_skipped(
    proxy_factory: ProxyFactory, primary: HashingBackend, shadow: HashingBackend
) -> None:
    sc = {"backend": "s", "percent": 100, "max_body": "1MiB"}
    proxy = proxy_factory(config(sc, p=primary.url, s=shadow.url))
    status, answer, _ = upload(proxy.port, "/up")
    assert (status, answer) == (200, f"primary {DIGEST} {BIG}".encode())
    got = settle(proxy, "up", "s", 1, timeout=30)
    assert got.get("skipped_body") == 1, nonzero(got)
    assert got.get("sent", 0) == 0, nonzero(got)
    assert shadow.bodies == []
    assert primary.bodies == [(DIGEST, BIG)]


def test_a_shadow_that_stops_reading_is_aborted_without_slowing_the_client(
    proxy_factory: ProxyFactory, primary: HashingBackend
) -> None:
    with StalledBackend() as stalled:
        sc = {"backend": "s", "percent": 100, "max_body": "1MiB", "stream_body": True}
        proxy = proxy_factory(config(sc, p=primary.url, s=stalled.url))
        # warm up (imports, the primary's first connection), then the idle footprint
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("GET", "/plain")
        assert conn.getresponse().read().startswith(b"primary ")
        conn.close()
        base = outcomes(proxy, "up", "s")
        idle = memory(proxy.pid)["VmRSS"]

        # 1. the baseline: the same upload on the unshadowed route of the same proxy
        status, answer, plain_seconds = upload(proxy.port, "/plain")
        assert (status, answer) == (200, f"primary {DIGEST} {BIG}".encode())

        # 2. an upload that stops half-way until the copy is aborted: the abort happens
        #    while the client is still sending (not at the body's end)
        before = outcomes(proxy, "up", "s")

        def aborted_since(counts: dict[str, float]) -> float:
            return outcomes(proxy, "up", "s").get("aborted", 0) - counts.get("aborted", 0)

        half_seen: list[float] = []

        def gate(sent: int) -> None:
            if sent == BIG // 2:
                wait_until(lambda: aborted_since(before) >= 1, 20, "the copy aborted")
                half_seen.append(aborted_since(before))

        status, answer, _ = upload(proxy.port, "/up", gate=gate)
        assert (status, answer) == (200, f"primary {DIGEST} {BIG}".encode())
        assert half_seen == [1], "the copy was not aborted while the upload went on"

        # 3. the same upload at full speed, timed: the stalled shadow does not slow it
        before = outcomes(proxy, "up", "s")
        status, answer, shadowed_seconds = upload(proxy.port, "/up")
        assert (status, answer) == (200, f"primary {DIGEST} {BIG}".encode())
        got = settle(proxy, "up", "s", 1, since=before, timeout=15)
        assert got.get("aborted") == 1, nonzero(got)
        print(f"plain {plain_seconds:.2f}s, with the stalled shadow {shadowed_seconds:.2f}s")
        assert shadowed_seconds <= plain_seconds * 3 + 2, (plain_seconds, shadowed_seconds)

        peak = memory(proxy.pid)["VmHWM"]
        grown = peak - idle
        print(f"idle {idle / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB")
        # three 32 MiB uploads went through; none was held whole (a body kept for the
        # stalled copy would be 32 MiB on its own)
        assert grown < BIG // 2, f"peak RSS grew {grown / MiB:.1f} MiB over idle"
        total = settle(proxy, "up", "s", 2, since=base, timeout=15)
        assert total.get("aborted") == 2, nonzero(total)
        assert stalled.heads == 2  # each copy connected and sent its head, then fell behind
        assert primary.bodies[1:] == [(DIGEST, BIG)] * 3  # after the warm-up GET's


def test_a_stream_takes_a_slot_or_is_dropped_never_queued(
    proxy_factory: ProxyFactory, primary: HashingBackend
) -> None:
    """`max_in_flight: 1`: while one streamed copy runs, the next big upload's copy finds no
    slot and is `dropped` at once (a stream cannot wait), even with a queue configured."""
    with StalledBackend() as stalled:
        sc = {"backend": "s", "percent": 100, "max_body": "1MiB", "stream_body": True,
              "max_in_flight": 1, "queue": 8}  # fmt: skip
        proxy = proxy_factory(config(sc, p=primary.url, s=stalled.url))
        second: list[tuple[int, bytes, float]] = []

        def gate(sent: int) -> None:
            if sent == 2 * MiB:  # the first copy holds the slot (connected, not yet behind)
                wait_until(lambda: stalled.heads == 1, 10, "the first copy's head")
                got = outcomes(proxy, "up", "s")
                assert got.get("sent") == 1 and not got.get("aborted"), nonzero(got)
                second.append(upload(proxy.port, "/up"))
                assert outcomes(proxy, "up", "s").get("dropped") == 1

        status, answer, _ = upload(proxy.port, "/up", gate=gate)
        assert (status, answer) == (200, f"primary {DIGEST} {BIG}".encode())
        assert [(st, body) for st, body, _ in second] == [(200, answer)]
        got = settle(proxy, "up", "s", 2, timeout=15)
        assert (got.get("dropped"), got.get("aborted")) == (1, 1), nonzero(got)
        assert stalled.heads == 1


def test_an_ordered_shadow_keeps_skipped_body(
    proxy_factory: ProxyFactory, primary: HashingBackend, shadow: HashingBackend
) -> None:
    """Ordered copies go after the primary answered, in its answers' order: a body that went
    by cannot wait for that, so `stream_body` does not apply to them."""
    sc = {"backend": "s", "percent": 100, "max_body": "1MiB", "stream_body": True,
          "ordered_by": "path"}  # fmt: skip
    proxy = proxy_factory(config(sc, p=primary.url, s=shadow.url))
    status, answer, _ = upload(proxy.port, "/up")
    assert (status, answer) == (200, f"primary {DIGEST} {BIG}".encode())
    got = settle(proxy, "up", "s", 1, timeout=15)
    assert got.get("skipped_body") == 1, nonzero(got)
    assert shadow.bodies == []


def test_a_client_that_leaves_mid_body_aborts_the_copy(
    proxy_factory: ProxyFactory, primary: HashingBackend, shadow: HashingBackend
) -> None:
    sc = {"backend": "s", "percent": 100, "max_body": "1MiB", "stream_body": True}
    proxy = proxy_factory(config(sc, p=primary.url, s=shadow.url))
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        sock.sendall(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % BIG)
        view = memoryview(BODY)
        for sent in range(0, 8 * MiB, PIECE):
            sock.sendall(view[sent : sent + PIECE])
        wait_until(lambda: outcomes(proxy, "up", "s").get("sent") == 1, 10, "the copy sent")
    finally:
        sock.close()  # a quarter of the body sent
    got = settle(proxy, "up", "s", 1, timeout=15)
    assert got.get("aborted") == 1, nonzero(got)
    assert shadow.bodies == [] and primary.bodies == []  # neither got a whole body


def test_a_streamed_copy_is_compared_on_its_answer(
    proxy_factory: ProxyFactory, primary: HashingBackend, shadow: HashingBackend, tmp_path: Any
) -> None:
    """Comparison is on the answers: the primary's and the shadow's differ in their tag."""
    sc = {"backend": "s", "percent": 100, "max_body": "1MiB", "stream_body": True,
          "compare": True}  # fmt: skip
    cfg = config(sc, p=primary.url, s=shadow.url)
    cfg["compare"] = {"store": f"sqlite:///{tmp_path / 'compare.db'}", "flush_interval": "200ms"}
    proxy = proxy_factory(cfg)
    status, answer, _ = upload(proxy.port, "/up")
    assert (status, answer) == (200, f"primary {DIGEST} {BIG}".encode())
    got = settle(proxy, "up", "s", 1, timeout=30)
    assert got.get("ok") == 1, nonzero(got)
    assert shadow.bodies == [(DIGEST, BIG)]

    def results() -> dict[str, float] | None:
        by = scrape(proxy).by("result", "shadowlane_comparisons_total", route="up", target="s")
        return by if sum(by.values()) >= 1 else None

    assert wait_until(results, 15, "the comparison counted") == {
        "match": 0,
        "diff": 1,
        "noise": 0,
        "dropped": 0,
    }


class ResettingBackend(SocketServer):
    """Reads the head and a MiB of the body, then resets the connection (a shadow that
    fails while the body streams)."""

    def handle(self, conn: socket.socket) -> None:
        got = 0
        try:
            while got < MiB:
                data = conn.recv(PIECE)
                if not data:
                    return
                got += len(data)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            return
        finally:
            conn.close()


def test_a_shadow_that_fails_mid_body_aborts_the_copy(
    proxy_factory: ProxyFactory, primary: HashingBackend
) -> None:
    with ResettingBackend() as resetting:
        sc = {"backend": "s", "percent": 100, "max_body": "1MiB", "stream_body": True}
        proxy = proxy_factory(config(sc, p=primary.url, s=resetting.url))
        status, answer, _ = upload(proxy.port, "/up")
        assert (status, answer) == (200, f"primary {DIGEST} {BIG}".encode())
        got = settle(proxy, "up", "s", 1, timeout=15)
        assert got.get("aborted") == 1 and got.get("sent") == 1, nonzero(got)  # not retried
        assert primary.bodies == [(DIGEST, BIG)]


def test_stream_body_must_be_a_boolean() -> None:
    text = """
backends:
  a: {endpoints: [http://127.0.0.1:1]}
  b: {endpoints: [http://127.0.0.1:2]}
routes:
  - name: r
    backend: a
    shadows: [{backend: b, stream_body: 3}]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    errors = info.value.errors
    assert len(errors) == 1 and errors[0].startswith("routes[0].shadows[0].stream_body: "), errors
    assert parse_config(text.replace("3", "true")).routes[0].shadows[0].stream_body is True
