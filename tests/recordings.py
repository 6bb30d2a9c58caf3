"""Recordings for the replay tests, made the way a recorder makes them.

Each request is sent for real to a real server and written with its answer in GoReplay's format
(`shadowlane.record.encode`); timestamps are set by the test, so the recorded spacing is exact.
Not in `support/`, which never imports shadowlane: these helpers write with its encoder.
"""

from __future__ import annotations

import gzip
import socket
import sys
import time
from pathlib import Path

from shadowlane.record import REQUEST, RESPONSE, Payload, encode
from support.proxy import HttpResponse, read_http_response

S = 1_000_000_000
T0 = 1_746_100_800 * S  # 2025-05-01T12:00:00Z
TIMEOUT = 60.0
REPLAY = [sys.executable, "-m", "shadowlane", "replay"]


def wire(resp: HttpResponse, method: str) -> bytes:
    """An answer as it went over the wire (a chunked body goes as one chunk)."""
    head = f"{resp.http_version} {resp.status} {resp.reason}\r\n".encode()
    head += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in resp.headers) + b"\r\n"
    if method == "HEAD" or resp.status in (204, 304):
        return head
    if (resp.header("transfer-encoding") or "").lower() == "chunked":
        body = resp.body
        return head + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return head + resp.body


def exchange(port: int, raw: bytes) -> tuple[bytes, int]:
    """Send one raw request to a real server; its answer's bytes and the latency in ns."""
    method = raw.split(b" ", 1)[0].decode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        t = time.perf_counter_ns()
        sock.sendall(raw)
        resp = read_http_response(sock, method)
        return wire(resp, method), time.perf_counter_ns() - t


def record(
    path: Path,
    requests: list[bytes],
    *,
    port: int | None = None,
    spacing: float = 0.0,
    start: int = T0,
    prefix: str = "r",
    gz: bool = False,
) -> list[Payload]:
    """A recording of `requests`, `spacing` seconds apart from `start`; with `port`, each was
    sent to that server and its answer is recorded too (type 2, after the request). The
    requests were sent one after the other, so none starts before the previous one's answer
    ended (start + latency), as in a real recording: the write order depends on it."""
    out: list[Payload] = []
    ended = 0
    for i, raw in enumerate(requests):
        ts = max(start + int(i * spacing * S), ended)
        out.append(Payload(REQUEST, f"{prefix}{i:04d}", ts, 0, raw))
        if port is not None:
            answer, latency = exchange(port, raw)
            out.append(Payload(RESPONSE, f"{prefix}{i:04d}", ts, latency, answer))
            ended = ts + latency
    data = b"".join(encode(p) for p in out)
    path.write_bytes(gzip.compress(data) if gz else data)
    return out


def get(path: str, port: int | None = None, extra: str = "") -> bytes:
    host = f"127.0.0.1:{port}" if port else "prod.example.com"
    return f"GET {path} HTTP/1.1\r\nhost: {host}\r\n{extra}\r\n".encode()
