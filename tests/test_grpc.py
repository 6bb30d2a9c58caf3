"""gRPC through the proxy end to end: a real grpcio server and client, `shop.proto` compiled at
test time (support/grpc_shop.py); HTTP/2 on both sides (`listen_http2`, `protocol: h2c`).

What must hold: every call succeeds for the client as the primary answered it (unary, server
streaming, client streaming), trailers (grpc-status, grpc-message) reach the client, NOT_FOUND
and DEADLINE_EXCEEDED pass through, and a shadow whose service changed a field gets a copy of
every unary and client-streaming call.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from support.grpc_shop import ShopServer, compile_shop
from support.metrics import scrape
from support.proxy import ProxyProcess
from support.wait import wait_until


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    return compile_shop(Path(tmp_path_factory.mktemp("grpc")))


def _config(primary: str, shadow: str | None = None, compare: bool = False) -> dict[str, Any]:
    backends: dict[str, Any] = {"v1": {"endpoints": [primary], "protocol": "h2c", "timeout": "10s"}}
    route: dict[str, Any] = {
        "name": "shop",
        "match": {"path_prefix": "/shop.Shop/"},
        "backend": "v1",
    }
    if shadow is not None:
        backends["v2"] = {"endpoints": [shadow], "protocol": "h2c", "timeout": "10s"}
        route["shadows"] = [{"backend": "v2", "percent": 100, "compare": compare}]
    return {"listen_http2": True, "backends": backends, "routes": [route], "access_log": True}


@pytest.fixture
def servers(shop: tuple[ModuleType, ModuleType]) -> Iterator[tuple[ShopServer, ShopServer]]:
    with ShopServer(shop) as primary, ShopServer(shop, variant="v2") as shadow:
        yield primary, shadow


def _stub(shop: tuple[ModuleType, ModuleType], proxy: ProxyProcess) -> tuple[Any, grpc.Channel]:
    channel = grpc.insecure_channel(f"{proxy.host}:{proxy.port}")
    return shop[1].ShopStub(channel), channel


def test_unary_calls_pass_and_every_copy_reaches_the_shadow(
    shop: tuple[ModuleType, ModuleType], servers: tuple[ShopServer, ShopServer]
) -> None:
    primary, shadow = servers
    pb2 = shop[0]
    with ProxyProcess(_config(primary.url, shadow.url)) as proxy:
        stub, channel = _stub(shop, proxy)
        with channel:
            for i in range(20):
                item = stub.Get(pb2.GetRequest(id=f"a{i}"), timeout=10)
                assert item.id == f"a{i}"
                assert item.name == f"item a{i}"  # the primary's answer, not the shadow's
                assert item.price == len(f"a{i}")
        assert primary.calls["Get"] == 20
        assert shadow.wait_calls("Get", 20) == 20
        log = wait_until(lambda: len(proxy.access_log()) >= 20 and proxy.access_log(), 5, "log")
        assert {r["protocol"] for r in log} == {"HTTP/2"}
        assert all(r["status"] == 200 and r["route"] == "shop" for r in log)


def test_not_found_and_deadline_exceeded_pass_through(
    shop: tuple[ModuleType, ModuleType], servers: tuple[ShopServer, ShopServer]
) -> None:
    primary, shadow = servers
    pb2 = shop[0]
    with ProxyProcess(_config(primary.url, shadow.url)) as proxy:
        stub, channel = _stub(shop, proxy)
        with channel:
            with pytest.raises(grpc.RpcError) as err:
                stub.Get(pb2.GetRequest(id="missing"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == "no item missing"  # grpc-message, a trailer
            with pytest.raises(grpc.RpcError) as err:
                stub.Get(pb2.GetRequest(id="slow", delay_ms=1500), timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # the connection still serves after both
            assert stub.Get(pb2.GetRequest(id="ok"), timeout=10).id == "ok"
        assert shadow.wait_calls("Get", 3) >= 3


def test_server_streaming(
    shop: tuple[ModuleType, ModuleType], servers: tuple[ShopServer, ShopServer]
) -> None:
    primary, _shadow = servers
    pb2 = shop[0]
    with ProxyProcess(_config(primary.url)) as proxy:
        stub, channel = _stub(shop, proxy)
        with channel:
            items = list(stub.List(pb2.ListRequest(count=500), timeout=20))
        assert [it.id for it in items] == [str(i) for i in range(500)]
        assert primary.calls["List"] == 1


def test_client_streaming_is_shadowed_within_max_body(
    shop: tuple[ModuleType, ModuleType], servers: tuple[ShopServer, ShopServer]
) -> None:
    primary, shadow = servers
    pb2 = shop[0]
    with ProxyProcess(_config(primary.url, shadow.url)) as proxy:
        stub, channel = _stub(shop, proxy)
        with channel:
            items = (pb2.Item(id=str(i), name="x" * 100, price=i) for i in range(200))
            summary = stub.Upload(items, timeout=20)
        assert (summary.count, summary.total) == (200, sum(range(200)))
        shadow.wait_calls("Upload", 1)
        wait_until(lambda: shadow.uploaded == [200], 10, "the shadow's copy of the whole stream")
        assert primary.uploaded == [200]


def test_compared_shadow_differs_and_statuses_are_compared(
    shop: tuple[ModuleType, ModuleType],
    servers: tuple[ShopServer, ShopServer],
    tmp_path: Path,
) -> None:
    """compare: true on the changed shadow: every pair of answers is compared (the lifting of
    protobuf to field paths is the comparison's; here the transport must hand both answers,
    trailers included, to it). Same-status pairs of NOT_FOUND calls differ by nothing the
    shadow changed."""
    primary, shadow = servers
    pb2 = shop[0]
    cfg = _config(primary.url, shadow.url, compare=True)
    cfg["compare"] = {"store": f"sqlite:///{tmp_path}/cmp.db", "flush_interval": "100ms"}
    with ProxyProcess(cfg) as proxy:
        stub, channel = _stub(shop, proxy)
        with channel:
            for i in range(10):
                assert stub.Get(pb2.GetRequest(id=f"c{i}"), timeout=10).id == f"c{i}"
            for _ in range(5):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Get(pb2.GetRequest(id="missing"), timeout=10)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND

        def compared() -> dict[str, float]:
            got = scrape(proxy).by("result", "shadowlane_comparisons_total", route="shop")
            return got if sum(got.values()) >= 15 else {}

        results = wait_until(compared, 15, "15 comparisons")
        # the 10 answers whose item name changed differ; the 5 NOT_FOUND answers (grpc-status
        # 5 in both trailers, no message) do not
        assert results.get("diff") == 10, results
        assert results.get("match", 0) + results.get("noise", 0) == 5, results
        assert shadow.calls["Get"] == 15
