"""Each peer format, three or more realistic objects of our own, run through the real proxy.

For every format: matches route as declared (and what should not match gets a 404 from no
route), weighted backends split as declared, and each declared shadow gets its copies at the
declared share, checked with a binomial bound on a bounded number of requests. The proxy runs
the documents unchanged (`run -c DIR --services FILE`) against loopback backends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.backend import RecordingBackend
from support.metrics import settle
from support.peers import Client, PeerProxy, services_for, within

FORMATS = Path(__file__).parent / "peers" / "formats"
MARKER = "x-shadowlane-shadow"


class Run:
    """The proxy on some of the format documents, with one backend per service name."""

    def __init__(self, stack: contextlib.ExitStack, files: dict[str, str], names: list[str]):
        self.b = {n: stack.enter_context(RecordingBackend()) for n in names}
        text = {}
        for name, body in files.items():
            for key, backend in self.b.items():
                body = body.replace(f"@{key}@", str(backend.port))
            text[name] = body
        self.proxy = PeerProxy(text, services_for(self.b))
        stack.callback(self.proxy.close)
        self.proxy.start()
        self.client = Client(self.proxy.port)
        stack.callback(self.client.close)

    def get(self, target: str, **kw: object) -> int:
        return self.client.request(target, **kw).status  # type: ignore[arg-type]

    def n(self, name: str) -> int:
        return len(self.b[name].requests)


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as s:
        yield s


def docs(*names: str) -> dict[str, str]:
    return {n.removesuffix(".in"): (FORMATS / n).read_text() for n in names}


def test_gateway_api_httproutes(stack: contextlib.ExitStack) -> None:
    names = [
        "cart-v1.shop",
        "cart-v2.shop",
        "cart-next.shop",
        "tenant-acme.shop",
        "health.shop",
        "api-shadow.shop",
        "search.shop",
        "search-v2.shop",
        "search-v3.shop",
    ]
    run = Run(stack, docs("gateway.yaml"), names)
    # matches: hostnames, whole-segment prefixes, exact + method, header, regex + query
    assert run.get("/cart/1", host="other.example.com") == 404
    assert run.get("/cartx", host="shop.example.com") == 404
    assert run.get("/api/health") == 200 and run.n("health.shop") == 1
    assert run.get("/api/health", method="POST") == 404
    assert run.get("/api/orders") == 404  # the tenant rule needs its header
    assert run.get("/search/shoes?lang=de") == 404
    assert run.get("/search/123?lang=en") == 404
    n = 200
    for i in range(n):
        assert run.get(f"/cart/{i}", host="shop.example.com") == 200
        assert run.get(f"/api/orders/{i}", headers=[("X-Tenant", "acme")]) == 200
    for i in range(100):
        assert run.get(f"/search/shoes?lang=en&i={i}") == 200
    px = run.proxy
    settle(px, "store.shop.r0", "cart-next.shop-8080-mirror", n)
    settle(px, "api.shop.r0", "api-shadow.shop-80-mirror", n)
    settle(px, "search.shop.r0", "search-v2.shop-80-mirror", 100)
    settle(px, "search.shop.r0", "search-v3.shop-80-mirror", 100)
    # weights 90/10: a smooth weighted round robin, so the split is exact up to rounding
    assert (
        within(run.n("cart-v1.shop"), n, 0.9) and run.n("cart-v1.shop") + run.n("cart-v2.shop") == n
    )
    assert within(run.n("cart-next.shop"), n, 0.5)
    assert within(run.n("api-shadow.shop"), n, 0.25)
    assert run.n("tenant-acme.shop") == n
    assert run.n("search-v2.shop") == 100 and within(run.n("search-v3.shop"), 100, 0.2)
    # the header modifier reaches the mirror copies; the primary is forwarded unchanged
    assert {r.header("x-mirrored-by") for r in run.b["api-shadow.shop"].requests} == {"gateway"}
    assert {r.header("x-mirrored-by") for r in run.b["tenant-acme.shop"].requests} == {None}
    assert {r.header("host") for r in run.b["cart-next.shop"].requests} == {
        "shop.example.com-shadow"
    }


def test_istio_virtualservices(stack: contextlib.ExitStack) -> None:
    names = [
        "reviews-v1.bookinfo",
        "reviews-v2.bookinfo",
        "reviews-v3.bookinfo",
        "reviews-next.bookinfo",
        "ratings.bookinfo",
        "ratings-a.bookinfo",
        "ratings-b.bookinfo",
        "details.bookinfo",
        "details-v2.bookinfo",
    ]
    run = Run(stack, docs("istio.yaml"), names)
    host = "reviews.example.com"
    for i in range(10):
        assert run.get(f"/reviews/{i}", host=host, headers=[("end-user", "jason")]) == 200
    assert run.n("reviews-v2.bookinfo") == 10
    n = 200
    for i in range(n):
        assert run.get(f"/reviews/{i}", host=host) == 200
        assert run.get("/ratings", method="POST") == 200
    assert run.get("/ratings") == 404  # POST only
    for i in range(20):
        assert run.get(f"/details/{i}", host="details") == 200
    px = run.proxy
    settle(px, "reviews.bookinfo.split", "reviews-next.bookinfo-mirror", n)
    settle(px, "ratings.bookinfo.http0", "ratings-a.bookinfo-mirror", n)
    settle(px, "ratings.bookinfo.http0", "ratings-b.bookinfo-mirror", n)
    settle(px, "details.bookinfo.http0", "details-v2.bookinfo-mirror", 20)
    assert within(run.n("reviews-v1.bookinfo"), n, 0.75)
    assert run.n("reviews-v1.bookinfo") + run.n("reviews-v3.bookinfo") == n
    assert within(run.n("reviews-next.bookinfo"), n, 0.3)
    assert run.n("ratings.bookinfo") == n and run.n("ratings-a.bookinfo") == n
    assert within(run.n("ratings-b.bookinfo"), n, 0.5)
    assert {r.header("x-env") for r in run.b["ratings-a.bookinfo"].requests} == {"shadow"}
    assert {r.header("x-env") for r in run.b["ratings.bookinfo"].requests} == {None}
    assert run.n("details-v2.bookinfo") == 20
    assert {r.header("host") for r in run.b["details-v2.bookinfo"].requests} == {"details-shadow"}
    assert {r.header("host") for r in run.b["reviews-next.bookinfo"].requests} == {
        "reviews.example.com-shadow"
    }


def test_emissary_mappings(stack: contextlib.ExitStack) -> None:
    names = [
        "quote.apps",
        "quote-v2.apps",
        "quote-shadow.apps",
        "quote-other.apps",
        "orders.apps",
        "orders-eu.apps",
    ]
    run = Run(stack, docs("emissary.yaml"), names)
    n = 200
    for i in range(n):
        assert run.get(f"/quote/{i}", host="quote.example.com") == 200
    assert run.get("/quote/1", host="other.example.com") == 404
    for i in range(10):
        assert run.get(f"/orders/{i}", method="POST", headers=[("X-Region", "eu")]) == 200
        assert run.get(f"/orders/{i}", method="POST") == 200
        assert run.get(f"/orders/{i}", headers=[("X-Region", "eu")]) == 200
    settle(run.proxy, "quote", "quote-shadow-8080", n)
    # the canary: weight 20 on quote-canary, the rest to quote
    assert (
        within(run.n("quote-v2.apps"), n, 0.2) and run.n("quote.apps") + run.n("quote-v2.apps") == n
    )
    assert within(run.n("quote-shadow.apps"), n, 0.5)
    assert run.n("quote-other.apps") == 0  # Emissary: one shadow per resource
    assert "Emissary allows one shadow per resource" in run.proxy.stderr_text()
    assert {r.header("host") for r in run.b["quote-shadow.apps"].requests} == {
        "quote.example.com-shadow"
    }
    assert run.n("orders-eu.apps") == 10 and run.n("orders.apps") == 20


def test_gloo_virtualservices(stack: contextlib.ExitStack) -> None:
    names = [
        "api-v1.gloo-system",
        "api-v2.gloo-system",
        "api-next.gloo-system",
        "status.ops",
        "debug.gloo-system",
        "debug-next.gloo-system",
        "catalog.gloo-system",
        "catalog-v2.gloo-system",
    ]
    run = Run(stack, docs("gloo.yaml"), names)
    n = 200
    for i in range(n):
        assert run.get(f"/api/{i}", host="shop.example.com") == 200
        assert run.get(f"/catalog/{i}", host="catalog.example.com") == 200
    assert run.get("/api/1", host="shop.example.com", method="POST") == 404
    assert run.get("/status") == 200 and run.n("status.ops") == 1
    assert run.get("/status/deep") == 404
    assert run.get("/debug/x") == 404
    for i in range(10):
        assert run.get(f"/debug/{i}", headers=[("X-Debug", "1")]) == 200
    px = run.proxy
    settle(px, "shop.gloo-system.r0", "api-next.gloo-system-shadow", n)
    settle(px, "catalog.gloo-system.r0", "catalog-v2.gloo-system-shadow", n)
    settle(px, "status.gloo-system.r1", "debug-next.gloo-system-shadow", 10)
    assert within(run.n("api-v1.gloo-system"), n, 0.75)
    assert run.n("api-v1.gloo-system") + run.n("api-v2.gloo-system") == n
    assert within(run.n("api-next.gloo-system"), n, 0.25)
    assert {r.header("x-gloo") for r in run.b["api-next.gloo-system"].requests} == {"shadow-copy"}
    assert within(run.n("catalog-v2.gloo-system"), n, 0.1)
    assert run.n("debug.gloo-system") == 10 and run.n("debug-next.gloo-system") == 10


def test_skipper_eskip_and_routegroup(stack: contextlib.ExitStack) -> None:
    names = [
        "checkout-v1",
        "checkout-v2",
        "users",
        "users-beta",
        "blue",
        "green",
        "orders-v1.shop",
        "orders-v2.shop",
        "audit",
    ]
    run = Run(stack, docs("skipper.eskip", "skipper-routegroup.yaml"), names)
    n = 200
    for i in range(n):
        assert run.get(f"/checkout?i={i}") == 200
        assert run.get("/color") == 200
        assert run.get(f"/orders/list/{i}", host="orders.example.org") == 200
    for i in range(10):
        assert run.get(f"/users/{i}", headers=[("X-Beta", "on")]) == 200
        assert run.get("/orders/submit", method="POST", host="orders.example.org") == 200
    assert run.get("/users/1") == 404  # Header("X-Beta", "on") is part of the match
    px = run.proxy
    settle(px, "split", "checkout-v2-8080", n)
    settle(px, "users", "users-beta-8080", 10)
    settle(px, "orders.shop.r1", "audit-9000", 10)
    assert run.n("checkout-v1") == n
    assert within(run.n("checkout-v2"), n, 0.3)
    copies = run.b["checkout-v2"].requests
    assert {(c.header("x-shadow"), c.header("x-tee-loopback-key")) for c in copies} == {("1", "co")}
    assert run.n("users") == 10 and run.n("users-beta") == 10
    assert {c.header("host") for c in run.b["users-beta"].requests} == {"users-beta:8080"}
    assert within(run.n("blue"), n, 0.25) and run.n("blue") + run.n("green") == n
    assert within(run.n("orders-v1.shop") - 10, n, 0.8)
    assert run.n("orders-v1.shop") - 10 + run.n("orders-v2.shop") == n
    assert run.n("audit") == 10
    assert {c.header("x-audit") for c in run.b["audit"].requests} == {"yes"}


def test_envoy_route_configuration_and_bootstrap(stack: contextlib.ExitStack) -> None:
    names = [
        "service1",
        "service1-shadow",
        "service1-canary",
        "tenant-a",
        "tenant-b",
        "items",
        "LEGACY",
        "LEGACY_NEXT",
    ]
    run = Run(stack, docs("envoy-routes.yaml", "envoy-bootstrap.yaml.in"), names)
    n = 200
    for i in range(n):
        assert run.get(f"/service/1/{i}") == 200
        assert run.get("/exact", headers=[("X-Tenant", "acme")]) == 200
        assert run.get(f"/page/{i}", host="legacy.example.com") == 200
    assert run.get("/exact") == 404
    assert run.get("/items/42") == 200 and run.n("items") == 1
    assert run.get("/items/abc") == 404
    px = run.proxy
    settle(px, "backend.r0", "service1-shadow-mirror", n)
    settle(px, "backend.r0", "service1-canary-mirror", n)
    settle(px, "legacy.r0", "legacy-next-mirror", n)
    assert run.n("service1") == n
    assert within(run.n("service1-shadow"), n, 0.25)
    assert run.n("service1-canary") == n
    # -shadow on the Host, unless disable_shadow_host_suffix_append
    assert {c.header("host") for c in run.b["service1-shadow"].requests} == {
        "shadowlane.test-shadow"
    }
    assert {c.header("host") for c in run.b["service1-canary"].requests} == {"shadowlane.test"}
    assert {c.header("x-envoy-vh") for c in run.b["service1-canary"].requests} == {"backend"}
    assert within(run.n("tenant-a"), n, 0.7) and run.n("tenant-a") + run.n("tenant-b") == n
    # the bootstrap's static clusters resolved the legacy names (the services map has none)
    assert run.n("LEGACY") == n and within(run.n("LEGACY_NEXT"), n, 0.5)
