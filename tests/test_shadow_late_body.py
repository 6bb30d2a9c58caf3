"""Uploads the primary answers before they end: the copies still get the whole body.

Backends that reject early (401, 413) or never read the body (nginx's `return`) answer while
the client is still sending. The proxy reads and drops the rest of such a body, to keep the
client's connection usable; the `with_request` shadow copies keep collecting it meanwhile
(within what the proxy retains for them) and go out once it is complete. If the client leaves
before that, the copies are counted `skipped_body`, never left unaccounted.

The primary here is a real socket server that answers as soon as it has the request head.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from support.backend import RecordingBackend, pattern_bytes
from support.configs import shadow_config
from support.metrics import outcomes
from support.proxy import ProxyProcess, read_http_response
from support.servers import SocketServer
from support.wait import wait_until

T = 5.0
EARLY = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 3\r\n\r\nno\n"


class EarlyAnswerBackend(SocketServer):
    """Answers 401 once it has a request head, then reads and drops whatever follows."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: list[bytes] = []

    def handle(self, conn: socket.socket) -> None:
        buf = b""
        answered = False
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)  # stop() shuts the connection down: b""
                except OSError:
                    return
                if not chunk:
                    return
                if answered:
                    continue  # the rest of the upload: dropped
                buf += chunk
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    with self._cond:
                        self.heads.append(buf[:end])
                    conn.sendall(EARLY)
                    answered = True


@pytest.fixture
def setup(
    backend: RecordingBackend, proxy_factory: Callable[..., ProxyProcess]
) -> Iterator[tuple[ProxyProcess, EarlyAnswerBackend, RecordingBackend]]:
    with EarlyAnswerBackend() as primary:
        config = shadow_config(
            {"p": {"endpoints": [primary.url]}, "s": {"endpoints": [backend.url]}},
            route="up",
            shadows=[{"backend": "s", "percent": 100, "max_body": "1MiB"}],
        )
        yield proxy_factory(config), primary, backend


def head(n: int) -> bytes:
    return (
        b"POST /upload?x=1 HTTP/1.1\r\nHost: api.example.com\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % n
    )


def test_copy_of_an_upload_answered_early_gets_the_whole_body(
    setup: tuple[ProxyProcess, EarlyAnswerBackend, RecordingBackend],
) -> None:
    proxy, primary, shadow = setup
    body = pattern_bytes(300_000)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=T) as sock:
        sock.sendall(head(len(body)) + body[:1000])
        resp = read_http_response(sock, "POST", timeout=T)
        assert resp.status == 401  # the answer came while the upload was still going
        assert len(primary.heads) == 1
        sock.sendall(body[1000:])
        (copy,) = shadow.wait_for_requests(1, T)
        assert copy.method == "POST" and copy.target == "/upload?x=1"
        assert copy.body == body
        # and the client's connection is still good for the next request
        sock.sendall(head(2) + b"ok")
        assert read_http_response(sock, "POST", timeout=T).status == 401
    wait_until(lambda: outcomes(proxy, "up", "s").get("ok") == 2, T, "both copies counted ok")
    assert outcomes(proxy, "up", "s").get("skipped_body") == 0


def test_copy_of_an_upload_abandoned_after_the_answer_is_skipped_body(
    setup: tuple[ProxyProcess, EarlyAnswerBackend, RecordingBackend],
) -> None:
    proxy, _, shadow = setup
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=T) as sock:
        sock.sendall(head(300_000) + pattern_bytes(1000))
        assert read_http_response(sock, "POST", timeout=T).status == 401
    # the client left with the upload unfinished: counted, not left waiting
    wait_until(
        lambda: outcomes(proxy, "up", "s").get("skipped_body") == 1, T, "the copy accounted for"
    )
    assert outcomes(proxy, "up", "s").get("sent") == 0
    assert shadow.requests == []
