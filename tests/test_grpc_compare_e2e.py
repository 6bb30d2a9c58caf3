"""gRPC comparison end to end: a real grpcio primary and a changed grpcio shadow behind the proxy
(HTTP/2 on both sides), compared with a descriptor set of their .proto; `shadowlane report`
names the changed field by its proto name, and the gRPC status codes are compared.

Needs the HTTP/2 transport and its test service (branch h2: `listen_http2`, `protocol: h2c`,
tests/support/grpc_shop.py); until both branches are merged this module is skipped. Checked on a
scratch merge of grpcmsg and h2 (see the grpcmsg report).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

grpc = pytest.importorskip("grpc")
grpc_shop = pytest.importorskip("support.grpc_shop", reason="needs the h2 branch's grpc_shop")

from support.proxy import ProxyProcess  # noqa: E402
from support.wait import wait_until  # noqa: E402

ShopServer: Any = grpc_shop.ShopServer


class GoneShop(ShopServer):  # type: ignore[misc]
    """The changed shadow: every name differs (variant), and id "gone" is NOT_FOUND here only."""

    def Get(self, request: Any, context: Any) -> Any:
        if request.id == "gone":
            self._count("Get")
            context.abort(grpc.StatusCode.NOT_FOUND, "no item gone")
        return super().Get(request, context)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_report_names_the_changed_field_and_compares_the_status(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = Path(tmp_path_factory.mktemp("grpc-e2e"))
    shop = grpc_shop.compile_shop(tmp)
    pb2 = shop[0]
    # the directory compile_shop wrote shop.proto to (once per session, maybe not `tmp`)
    protos = Path(pb2.__file__).parent
    descriptors = tmp / "shop.pb"
    done = _run(
        "-m",
        "grpc_tools.protoc",
        f"-I{protos}",
        "--include_imports",
        f"--descriptor_set_out={descriptors}",
        str(protos / "shop.proto"),
    )
    assert done.returncode == 0, done.stderr
    store = f"sqlite:///{tmp}/compare.db"
    with ShopServer(shop) as primary, GoneShop(shop, variant="v2") as shadow:
        cfg = {
            "listen_http2": True,
            "backends": {
                "v1": {"endpoints": [primary.url], "protocol": "h2c"},
                "v2": {"endpoints": [shadow.url], "protocol": "h2c"},
            },
            "routes": [
                {
                    "name": "shop",
                    "match": {"path_prefix": "/shop.Shop/"},
                    "backend": "v1",
                    "compare": {"grpc": {"descriptor_set": str(descriptors)}},
                    "shadows": [{"backend": "v2", "percent": 100, "compare": True}],
                }
            ],
            "compare": {"store": store, "flush_interval": "100ms"},
        }
        with ProxyProcess(cfg) as proxy:
            channel = grpc.insecure_channel(f"{proxy.host}:{proxy.port}")
            stub = shop[1].ShopStub(channel)
            with channel:
                # every call is answered by the primary, whatever the shadow says
                for i in range(20):
                    assert stub.Get(pb2.GetRequest(id=f"a{i}"), timeout=10).name == f"item a{i}"
                for _ in range(5):
                    assert stub.Get(pb2.GetRequest(id="gone"), timeout=10).id == "gone"
            assert shadow.wait_calls("Get", 25) == 25

            def stored() -> dict[str, Any] | None:
                out = _run("-m", "shadowlane", "report", "--store", store, "--format", "json")
                if out.returncode != 0:
                    return None
                rows = orjson.loads(out.stdout)["comparisons"]
                return rows[0] if rows and rows[0]["compared"] >= 25 else None

            row = wait_until(stored, 30, "25 comparisons in the store")
    assert row["compared"] == 25 and row["differing"] == 25
    fields = {f["field"]: f for f in row["fields"]}
    # the shadow renamed every item: by proto name, in message 0 of each answer
    assert fields["body[0].name"]["raw"] == 25 and fields["body[0].name"]["reported"]
    # OK from the primary, NOT_FOUND from the shadow, for the 5 calls of "gone"
    assert fields["status.grpc"]["raw"] == 5
    assert fields["status.grpc_message"]["raw"] == 5
    text = _run("-m", "shadowlane", "report", "--store", store)
    assert text.returncode == 0, text.stderr
    assert "body[0].name" in text.stdout and "status.grpc" in text.stdout
