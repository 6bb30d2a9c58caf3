"""The demo's backends: a small JSON "orders and catalog" API, in a v1 and a v2.

Both versions serve the same data (made from a fixed seed, so every instance agrees) and
differ where a real migration would:

- `GET /orders/{id}`: v2 renamed `customer_name` to `customer`, returns `total` as a string
  (`"41.50"` instead of `41.5`) and adds `currency`;
- `POST /orders`: v2 answers `202 Accepted` with `"status": "pending"` and a `links` object,
  where v1 answers `201 Created` with `"status": "created"` (the endpoint that changed);
- `GET /orders/{id}` answers carry a header `x-api-version: 1` or `2`;
- `GET /catalog`: v2 lists the same items in another order (the demo compares that array as
  unordered, so it is no difference).

Every JSON answer of both versions also carries per-answer noise: a random `request_uuid`, a
`generated_at` timestamp and a random `took` (ms). A second v1 instance (the `secondary`) lets
shadowlane see that those differ between two v1 answers too, so they are noise, not differences.

Served by shadowlane's own `wire.server` (an `App` with `handle(exchange)`), in the caller's
event loop; each answer waits a little (v2 a bit longer) so the latency comparison has
something to show.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from shadowlane.wire.server import Exchange, ServerLimits, ServerState

__all__ = ["CATALOG", "DemoBackend", "DemoService", "order", "start_backend"]

Version = Literal["v1", "v2"]

_SEED = 20240601
_NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Radia"]
_STATUSES = ["paid", "shipped", "delivered", "cancelled"]

CATALOG: list[dict[str, Any]] = [
    {"sku": f"SKU-{i:03d}", "name": name, "price": price, "category": category}
    for i, (name, price, category) in enumerate(
        [
            ("mechanical keyboard", 89.0, "input"),
            ("trackball", 45.5, "input"),
            ("27in monitor", 279.99, "display"),
            ("usb-c dock", 129.0, "hubs"),
            ("laptop stand", 35.25, "desk"),
            ("desk lamp", 24.9, "desk"),
            ("noise-cancelling headset", 159.0, "audio"),
            ("webcam", 64.75, "video"),
        ],
        start=1,
    )
]
_BY_SKU = {item["sku"]: item for item in CATALOG}

ORDER_IDS = range(1, 41)

_ORDER_PATH = re.compile(r"^/orders/(\d+)$")
_SKU_PATH = re.compile(r"^/catalog/([A-Za-z0-9-]+)$")

_REASONS = {
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    404: b"Not Found",
    405: b"Method Not Allowed",
}


def order(order_id: int) -> dict[str, Any]:
    """The order with this id, the same in every instance (v1 field names)."""
    rnd = random.Random(_SEED * 1000 + order_id)
    items = []
    for item in rnd.sample(CATALOG, rnd.randint(1, 3)):
        items.append({"sku": item["sku"], "qty": rnd.randint(1, 3), "price": item["price"]})
    total = round(sum(i["qty"] * i["price"] for i in items), 2)
    return {
        "id": order_id,
        "customer_name": rnd.choice(_NAMES),
        "status": rnd.choice(_STATUSES),
        "items": items,
        "total": total,
    }


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[bytes, bytes], ...] = ()


class DemoService:
    """The demo API in one version: request in, answer out (no I/O here)."""

    def __init__(self, version: Version) -> None:
        self.version = version

    def answer(self, method: str, path: str, query: str, body: bytes) -> Answer:
        if path == "/orders":
            if method == "POST":
                return self._create_order(body)
            if method == "GET":
                return self._orders(query)
            return Answer(405, {"error": "method not allowed"})
        if method != "GET":
            return Answer(405, {"error": "method not allowed"})
        m = _ORDER_PATH.match(path)
        if m:
            order_id = int(m.group(1))
            if order_id not in ORDER_IDS:
                return Answer(404, {"error": "no such order", "id": order_id})
            version = b"1" if self.version == "v1" else b"2"
            return Answer(200, self._order(order(order_id)), ((b"x-api-version", version),))
        if path == "/catalog":
            items = list(CATALOG)
            if self.version == "v2":
                items.sort(key=lambda i: i["name"])  # same items, another order
            return Answer(200, {"items": items, "count": len(items)})
        m = _SKU_PATH.match(path)
        if m:
            item = _BY_SKU.get(m.group(1))
            if item is None:
                return Answer(404, {"error": "no such item", "sku": m.group(1)})
            return Answer(200, dict(item))
        if path == "/":
            return Answer(200, {"service": "demo shop", "endpoints": ["/orders", "/catalog"]})
        return Answer(404, {"error": "not found", "path": path})

    def _order(self, o: dict[str, Any]) -> dict[str, Any]:
        if self.version == "v1":
            return o
        out = {k: v for k, v in o.items() if k != "customer_name"}
        out["customer"] = o["customer_name"]  # renamed
        out["total"] = f"{o['total']:.2f}"  # a number became a string
        out["currency"] = "EUR"  # an extra field
        return out

    def _orders(self, query: str) -> Answer:
        limit = 5
        for part in query.split("&"):
            key, _, value = part.partition("=")
            if key == "limit" and value.isdigit():
                limit = max(1, min(20, int(value)))
        listed = [order(i) for i in list(ORDER_IDS)[:limit]]
        summaries = [
            {"id": o["id"], "status": o["status"], "items": len(o["items"])} for o in listed
        ]
        return Answer(200, {"orders": summaries, "count": len(ORDER_IDS)})

    def _create_order(self, body: bytes) -> Answer:
        # The id depends only on the request, so v1, its twin and v2 agree on it.
        new_id = 1000 + zlib.crc32(body) % 9000
        if self.version == "v1":
            return Answer(201, {"id": new_id, "status": "created"})
        return Answer(
            202, {"id": new_id, "status": "pending", "links": {"self": f"/orders/{new_id}"}}
        )


class DemoBackend:
    """A `wire.server` App serving one `DemoService` with per-answer noise and some latency."""

    def __init__(
        self, name: str, version: Version, latency: tuple[float, float] = (0.002, 0.006)
    ) -> None:
        self.name = name
        self.service = DemoService(version)
        self.latency = latency
        self.requests = 0
        self._rnd = random.Random()

    def handle(self, exchange: Exchange) -> None:
        self.requests += 1
        # Also for bodiless requests: the consumer's end fires once the message is complete,
        # and answering before that would make the server close the connection.
        chunks: list[bytes] = []
        exchange.set_body_consumer(
            chunks.append, lambda: self._reply_later(exchange, b"".join(chunks))
        )

    def _reply_later(self, exchange: Exchange, body: bytes) -> None:
        delay = self._rnd.uniform(*self.latency)
        asyncio.get_running_loop().call_later(delay, self._reply, exchange, body)

    def _reply(self, exchange: Exchange, body: bytes) -> None:
        if exchange.response_done:
            return
        req = exchange.request
        status, headers, data = self.render(req.method, req.path, req.query, body)
        exchange.start_response(status, _REASONS.get(status, b"Unknown"), headers, len(data))
        exchange.send_body(data)
        exchange.end_response()

    def render(
        self, method: str, path: str, query: str, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The whole answer to one request: status, headers, JSON body with fresh noise."""
        answer = self.service.answer(method, path, query, body)
        payload = dict(answer.body)
        # Noise: different in every answer, whichever version gives it.
        payload["request_uuid"] = str(uuid.uuid4())
        payload["generated_at"] = datetime.now(UTC).isoformat(timespec="microseconds")
        payload["took"] = self._rnd.randint(1, 40)
        data = orjson.dumps(payload)
        headers = [
            (b"content-type", b"application/json"),
            *answer.headers,
            (b"date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()).encode()),
        ]
        return answer.status, headers, data


async def start_backend(
    backend: DemoBackend, host: str = "127.0.0.1", port: int = 0
) -> tuple[asyncio.base_events.Server, ServerState, int]:
    """Listen for `backend` on `host:port` (0: a free port); returns the server, state, port."""
    state = ServerState(backend, ServerLimits())
    loop = asyncio.get_running_loop()
    server = await loop.create_server(state.protocol_factory, host, port)
    bound: int = server.sockets[0].getsockname()[1]
    return server, state, bound
