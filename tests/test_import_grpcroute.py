"""Gateway API `GRPCRoute` runs unchanged: methods routed, `RequestMirror` shadowed, over HTTP/2.

A gateway that serves gRPC speaks HTTP/2 to its clients and to the backends; a GRPCRoute's
`method` match is a match on the call's path (`/service/method`). The translation is checked
as `shadowlane import` writes it, and end to end: `run -c DIR --services FILE` on the route
document as written, a real grpcio client and two real grpcio servers (the shop of
tests/support/grpc_shop.py), the mirror getting a copy of every call of the mirrored method
and none of the others.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import yaml

from support.grpc_shop import ShopServer, compile_shop
from support.metrics import scrape, settle
from support.peers import PeerProxy

GRPC_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: shop, namespace: web}
spec:
  parentRefs: [{name: gateway}]
  rules:
  - name: everything-else
    matches:
    - method: {service: shop.Shop}
    backendRefs: [{name: shop, port: 50051}]
  - name: reads
    matches:
    - method: {service: shop.Shop, method: Get}
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: shop-v2, port: 50051}
    backendRefs: [{name: shop, port: 50051}]
  - name: by-pattern
    matches:
    - method: {type: RegularExpression, service: "admin\\\\..*"}
      headers: [{name: x-tenant, value: blue}]
    backendRefs: [{name: shop, port: 50051}]
"""


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    return compile_shop(Path(tmp_path_factory.mktemp("grpc")))


def imported(tmp_path: Path) -> dict[str, Any]:
    route = tmp_path / "grpcroute.yaml"
    route.write_text(GRPC_ROUTE)
    done = subprocess.run(
        [sys.executable, "-m", "shadowlane", "import", str(route), "--strict"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert isinstance(config, dict)
    return config


def test_a_grpcroute_translates_to_http2_routes_in_the_specs_precedence(tmp_path: Path) -> None:
    config = imported(tmp_path)
    assert config["listen_http2"] is True
    assert {b["protocol"] for b in config["backends"].values()} == {"h2c"}
    routes = config["routes"]
    # the spec's precedence: the longest service, then the longest method, then the most
    # headers: the method rule first although it is written second, then (services of nine
    # characters each) the one with a header match
    assert [r["match"] for r in routes] == [
        {"path": "/shop.Shop/Get"},
        {"path_regex": "^/(?:admin\\..*)/(?:[^/]+)$", "headers": {"x-tenant": "blue"}},
        {"path_regex": "^/shop\\.Shop/[^/]+$"},
    ]
    assert [len(r.get("shadows", [])) for r in routes] == [1, 0, 0]
    mirror = routes[0]["shadows"][0]
    assert mirror["percent"] == 100
    assert config["backends"][mirror["backend"]]["protocol"] == "h2c"


def test_a_grpcroute_runs_unchanged_and_mirrors_its_method(
    shop: tuple[ModuleType, ModuleType],
) -> None:
    pb2, pb2_grpc = shop
    with ShopServer(shop) as primary, ShopServer(shop, variant="v2") as mirror:
        services = {"shop.web": [primary.url], "shop-v2.web": [mirror.url]}
        with PeerProxy({"grpcroute.yaml": GRPC_ROUTE}, services) as proxy:
            channel = grpc.insecure_channel(f"{proxy.host}:{proxy.port}")
            try:
                stub = pb2_grpc.ShopStub(channel)
                listed = [i.id for i in stub.List(pb2.ListRequest(count=3), timeout=10)]
                assert listed == ["0", "1", "2"]
                for n in range(20):
                    item = stub.Get(pb2.GetRequest(id=f"i{n}"), timeout=10)
                    assert item.name == f"item i{n}"  # the primary's answer, not the mirror's
                with pytest.raises(grpc.RpcError) as missing:
                    stub.Get(pb2.GetRequest(id="missing"), timeout=10)
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            finally:
                channel.close()
            assert primary.calls["Get"] == 21 and primary.calls["List"] == 1
            mirror.wait_calls("Get", 21)
            routes = scrape(proxy).by("route", "shadowlane_requests_total")
            reads = next(r for r in routes if r.endswith(".reads"))
            counts = settle(proxy, reads, next(iter(proxy_shadow_targets(proxy))), 21)
            assert counts.get("ok") == 21, counts
        # every copy of the mirrored method came, and none of the other rule's
        assert mirror.calls["List"] == 0


def proxy_shadow_targets(proxy: PeerProxy) -> set[str]:
    return set(scrape(proxy).by("target", "shadowlane_shadow_requests_total"))
