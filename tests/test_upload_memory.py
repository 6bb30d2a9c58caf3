"""1 MiB uploads shadowed to a fast backend stay in bounded memory in the proxy's process.

The proxy runs as a subprocess; two real backends on 127.0.0.1 read each body whole and answer
(one the primary, one the shadow). A bounded load (CONNECTIONS keep-alive clients, PER_CONN
uploads each) goes through; the proxy's peak RSS (VmHWM from /proc) may grow over its idle RSS
by at most what the uploads in flight need: the body being read, kept as the chunks it came in
and shared by the primary and the shadow copy (BODY_BUDGET per connection), plus a fixed
allowance for buffers and the allocator. A body copied once per shadow or per chunk would need
several times that, and so would finished uploads left for the cyclic GC: with a primary that
answers before it reads the body (nginx's `return 200`), each finished call once stayed in a
reference cycle with its exchange, whole body included, until a collection that this load never
triggers.
"""

from __future__ import annotations

import http.client
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any

import pytest

from support.configs import backend_entry
from support.metrics import settle
from support.procfs import memory
from support.proxy import ProxyProcess

MiB = 1 << 20
CONNECTIONS = 16
PER_CONN = 16
BODY = os.urandom(MiB)
#: peak RSS allowed per upload in flight, and once for the process
BODY_BUDGET = 3 * MiB
SLACK = 48 * MiB
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class Discarding(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 backend that reads each request body whole (counting it) and answers 200."""

    daemon_threads = True
    allow_reuse_address = True
    #: answered early, each upload's connection is dropped and the next one connects anew: the
    #: default backlog of 5 overflows and a dropped SYN is retried only after the connect timeout
    request_queue_size = 128

    def __init__(self, early: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        #: answer at the end of the head, then read the body (and drop it)
        self.early = early
        self.heads = 0
        self.bodies = 0
        self.body_bytes = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(socketserver.StreamRequestHandler):
    server: Discarding

    def handle(self) -> None:
        buf = bytearray(256 * 1024)
        while True:
            line = self.rfile.readline()
            if not line:
                return
            length = 0
            while (h := self.rfile.readline()) not in (b"\r\n", b""):
                name, _, value = h.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            with self.server.lock:
                self.server.heads += 1
            if self.server.early:
                self.wfile.write(ANSWER)
            left = length
            while left:
                try:
                    n = self.rfile.readinto(memoryview(buf)[: min(left, len(buf))])
                except OSError:  # answered early, the proxy may drop the rest
                    return
                if not n:
                    return
                left -= n
            with self.server.lock:
                self.server.bodies += 1
                self.server.body_bytes += length
            if not self.server.early:
                self.wfile.write(ANSWER)


def upload_load(port: int) -> int:
    ok = [0] * CONNECTIONS
    errors: list[str] = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for _ in range(PER_CONN):
                conn.request("POST", "/up", body=BODY)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200 and body == b"ok":
                    ok[k] += 1
                else:
                    errors.append(f"{resp.status} {body[:200]!r}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
            return
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return sum(ok)


def shadowed_uploads(primary: Discarding, shadow: Discarding) -> dict[str, Any]:
    """One route to `primary`, every request copied to `shadow` (bodies up to 2 MiB)."""
    return {
        "backends": {"p": backend_entry(primary.url), "s": backend_entry(shadow.url)},
        "routes": [{"name": "up", "match": {"path_prefix": "/"}, "backend": "p",
                    "shadows": [{"backend": "s", "percent": 100, "max_body": "2MiB"}]}],
    }  # fmt: skip


@pytest.mark.parametrize("early", [False, True], ids=["answer-after-body", "answer-early"])
def test_shadowed_uploads_stay_in_bounded_memory(
    proxy_factory: Callable[[dict[str, Any]], ProxyProcess], early: bool
) -> None:
    primary, shadow = Discarding(early=early), Discarding()
    try:
        proxy = proxy_factory(shadowed_uploads(primary, shadow))
        with socket.create_connection(("127.0.0.1", proxy.port)):
            pass
        idle = memory(proxy.pid)["VmRSS"]
        answered = upload_load(proxy.port)
        peak = memory(proxy.pid)["VmHWM"]
        total = CONNECTIONS * PER_CONN
        assert answered == total, f"{answered} of {total} uploads answered"
        # the client's answers do not wait for the copies: the last ones may still be going.
        # Every copy ends in one terminal outcome; on a loaded machine some may time out
        outcomes = settle(proxy, "up", "s", total, timeout=60)
        ended = sum(outcomes.get(o, 0) for o in ("ok", "dropped", "timeout"))
        assert ended == total, outcomes
        assert outcomes.get("ok", 0) >= total // 2, outcomes  # most copies went
        if early:  # the proxy drops a connection answered before its body was all sent
            assert primary.heads == total
        else:
            assert primary.body_bytes == total * MiB
        assert shadow.body_bytes == outcomes["ok"] * MiB  # each copy arrived whole
        grown = peak - idle
        bound = CONNECTIONS * BODY_BUDGET + SLACK
        print(f"idle {idle / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, bound {bound / MiB:.0f}")
        assert grown <= bound, (
            f"peak RSS grew {grown / MiB:.0f} MiB over idle for {CONNECTIONS} uploads in "
            f"flight (allowed {bound / MiB:.0f} MiB)"
        )
    finally:
        primary.stop()
        shadow.stop()


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])  # field 10: minflt


def test_big_uploads_reuse_the_heap_instead_of_faulting_it_in_again(
    proxy_factory: Callable[[dict[str, Any]], ProxyProcess],
) -> None:
    """glibc's adaptive thresholds hand the top of the heap back to the kernel whenever 2 MiB
    of it is free, so each 1 MiB body was faulted in again, zeroed (this load without the
    tuning: 181 page faults per upload, and a higher peak RSS). With the proxy's fixed
    thresholds (app/process.py) a warm process reuses its heap: a second round of the same
    uploads faults in almost nothing."""
    primary, shadow = Discarding(), Discarding()
    try:
        proxy = proxy_factory(shadowed_uploads(primary, shadow))
        total = CONNECTIONS * PER_CONN
        assert upload_load(proxy.port) == total  # warm: the heap grows to what the load needs
        settle(proxy, "up", "s", total, timeout=60)
        before = _minor_faults(proxy.pid)
        assert upload_load(proxy.port) == total
        faults = _minor_faults(proxy.pid) - before
        assert primary.body_bytes == 2 * total * MiB
        per_upload = faults / total
        print(f"{faults} minor faults for {total} uploads: {per_upload:.1f} each")
        # a 1 MiB body is 256 pages; faulting it in again once per upload is >= 64 each
        assert per_upload < 16, f"{per_upload:.0f} page faults per 1 MiB upload"
    finally:
        primary.stop()
        shadow.stop()
