"""Raw-socket HTTP clients for e2e tests: one request per connection, one keep-alive
connection, one request on its own thread.

Why raw sockets and not ``requests``: these tests are about connections (was a keep-alive
connection kept across a reload, was it closed by a drain, did a request in flight get its
answer), and a client library that pools, retries and reconnects on its own would hide exactly
that. Responses are read by :func:`support.proxy.read_http_response`; every read is bounded.
"""

from __future__ import annotations

import socket
import threading

from .proxy import LOOPBACK, HttpResponse, read_http_response

#: the Host every request here sends (routes in these tests match on paths only)
HOST = "shadowlane.test"


def get(
    port: int,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    method: str = "GET",
    *,
    timeout: float = 5.0,
) -> HttpResponse:
    """One request (no body) on a fresh connection to 127.0.0.1:``port``; its response."""
    head = f"{method} {target} HTTP/1.1\r\nHost: {HOST}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers or [])
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n")
        return read_http_response(sock, method, timeout=timeout)


class KeepAlive:
    """One client keep-alive connection; ``connects`` counts how often it had to (re)connect,
    so a test can prove the proxy never closed it (``connects == 1``)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.connects = 0
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        self.connects += 1
        return socket.create_connection((LOOPBACK, self.port), timeout=self.timeout)

    def get(self, target: str) -> HttpResponse:
        """GET ``target`` on this connection; reconnect afterwards if the proxy said close."""
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        resp = read_http_response(self.sock, timeout=self.timeout)
        if (resp.header("connection") or "").lower() == "close":
            self.reconnect()
        return resp

    def reconnect(self) -> None:
        self.sock.close()
        self.sock = self._connect()

    def close(self) -> None:
        self.sock.close()


class InFlight(threading.Thread):
    """A :func:`get` sent from its own thread, so the test can act (signal, reload) while it
    waits; ``result`` is the response or the exception it raised."""

    def __init__(self, port: int, target: str, timeout: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.target = target
        self.timeout = timeout
        self.result: HttpResponse | BaseException | None = None

    def run(self) -> None:
        try:
            self.result = get(self.port, self.target, timeout=self.timeout)
        except BaseException as e:
            self.result = e

    def response(self) -> HttpResponse:
        """Join (bounded) and return the response; fails the test if there was none."""
        self.join(self.timeout)
        assert not self.is_alive(), f"{self.target}: no answer within {self.timeout}s"
        assert isinstance(self.result, HttpResponse), f"{self.target}: {self.result!r}"
        return self.result


__all__ = ["HOST", "InFlight", "KeepAlive", "get"]
