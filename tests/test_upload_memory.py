"""1 MiB uploads shadowed to a fast backend stay in bounded memory in the proxy's process.

The proxy runs as a subprocess; two real backends on 127.0.0.1 read each body whole and answer
(one the primary, one the shadow). A bounded load (CONNECTIONS keep-alive clients, PER_CONN
uploads each) goes through; the proxy's peak RSS (VmHWM from /proc) may grow over its idle RSS
by at most what the uploads in flight need: the body being read and its one joined copy, shared
by the primary and the shadow copy (BODY_BUDGET per connection), plus a fixed allowance for
buffers and the allocator. A body copied once per shadow or per chunk would need several times
that.
"""

from __future__ import annotations

import http.client
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any

from support.configs import backend_entry
from support.metrics import settle
from support.procfs import memory
from support.proxy import ProxyProcess

MiB = 1 << 20
CONNECTIONS = 16
PER_CONN = 8
BODY = os.urandom(MiB)
#: peak RSS allowed per upload in flight, and once for the process
BODY_BUDGET = 3 * MiB
SLACK = 48 * MiB


class Discarding(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 backend that reads each request body whole (counting it) and answers 200."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
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
            left = length
            while left:
                n = self.rfile.readinto(memoryview(buf)[: min(left, len(buf))])
                if not n:
                    return
                left -= n
            with self.server.lock:
                self.server.bodies += 1
                self.server.body_bytes += length
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


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


def test_shadowed_uploads_stay_in_bounded_memory(
    proxy_factory: Callable[[dict[str, Any]], ProxyProcess],
) -> None:
    primary, shadow = Discarding(), Discarding()
    try:
        cfg = {
            "backends": {"p": backend_entry(primary.url), "s": backend_entry(shadow.url)},
            "routes": [{"name": "up", "match": {"path_prefix": "/"}, "backend": "p",
                        "shadows": [{"backend": "s", "percent": 100, "max_body": "2MiB"}]}],
        }  # fmt: skip
        proxy = proxy_factory(cfg)
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
