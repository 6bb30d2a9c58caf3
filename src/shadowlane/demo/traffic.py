"""The demo's traffic: a few requests per second across the demo API, through the proxy.

One keep-alive connection, one request at a time, paced to `rate` per second, so the load is
bounded whatever the proxy does. The mix touches every endpoint, including the ones whose
answers changed in v2 and some 404s. Responses are parsed with httptools (our server's parser,
but the demo is not a test of it: the tests drive the proxy with independent clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from dataclasses import dataclass, field

import httptools
import orjson

from shadowlane.demo.backends import CATALOG, ORDER_IDS

__all__ = ["TrafficStats", "next_request", "run_traffic"]

#: (weight, kind) of each kind of request in the mix
_MIX = [
    (30, "order"),
    (10, "orders"),
    (10, "create"),
    (15, "catalog"),
    (25, "item"),
    (5, "missing"),
    (5, "missing_order"),
]


@dataclass
class TrafficStats:
    sent: int = 0
    answered: int = 0
    errors: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


def next_request(rnd: random.Random, n: int) -> tuple[str, str, bytes]:
    """The `n`-th request of the mix: (method, target, body)."""
    kinds = [k for _, k in _MIX]
    weights = [w for w, _ in _MIX]
    kind = rnd.choices(kinds, weights)[0]
    if kind == "order":
        return "GET", f"/orders/{rnd.choice(list(ORDER_IDS))}", b""
    if kind == "orders":
        return "GET", f"/orders?limit={rnd.randint(3, 8)}", b""
    if kind == "create":
        item = rnd.choice(CATALOG)
        body = {"customer": f"user-{n % 17}", "items": [{"sku": item["sku"], "qty": 1}]}
        return "POST", "/orders", orjson.dumps(body)
    if kind == "catalog":
        return "GET", "/catalog", b""
    if kind == "item":
        return "GET", f"/catalog/{rnd.choice(CATALOG)['sku']}", b""
    if kind == "missing":
        return "GET", "/catalog/SKU-999", b""
    return "GET", f"/orders/{900 + n % 50}", b""


class _Response:
    """httptools callbacks collecting one response."""

    def __init__(self) -> None:
        self.done = False
        self.body = bytearray()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class _Client:
    """A keep-alive HTTP/1.1 connection to the proxy; reconnects when it is closed."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str, body: bytes, user: str) -> int:
        async with asyncio.timeout(self.timeout):
            if self._writer is None or self._writer.is_closing():
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            assert self._reader is not None
            head = (
                f"{method} {target} HTTP/1.1\r\nhost: demo.shadowlane.local\r\n"
                f"user-agent: shadowlane-demo\r\nx-user-id: {user}\r\naccept: application/json\r\n"
            )
            if body:
                head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            self._writer.write(head.encode("ascii") + b"\r\n" + body)
            collected = _Response()
            parser = httptools.HttpResponseParser(collected)
            while not collected.done:
                data = await self._reader.read(65536)
                if not data:
                    raise ConnectionError("connection closed mid-response")
                parser.feed_data(data)
            status: int = parser.get_status_code()
            if not parser.should_keep_alive():
                self.close()
            return status

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._reader = None


async def run_traffic(
    host: str,
    port: int,
    *,
    rate: float = 5.0,
    requests: int | None = None,
    stats: TrafficStats | None = None,
    seed: int | None = None,
    timeout: float = 10.0,
) -> TrafficStats:
    """Send the mix to `host:port` at `rate` requests/s until `requests` are sent (or forever).

    Failures (proxy not up yet, a reset) are counted and the next request reconnects; the
    pace stays the same, so a dead proxy is retried `rate` times a second, never faster.
    """
    stats = stats if stats is not None else TrafficStats()
    rnd = random.Random(seed)
    client = _Client(host, port, timeout)
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = loop.time()
    counter = itertools.count() if requests is None else iter(range(requests))
    try:
        for n in counter:
            method, target, body = next_request(rnd, n)
            stats.sent += 1
            try:
                status = await client.request(method, target, body, f"u{n % 23}")
            except (OSError, TimeoutError, httptools.HttpParserError):
                stats.errors += 1
                client.close()
            else:
                stats.answered += 1
                stats.by_status[status] = stats.by_status.get(status, 0) + 1
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = loop.time()  # fell behind: do not burst to catch up
    finally:
        with contextlib.suppress(Exception):
            client.close()
    return stats
