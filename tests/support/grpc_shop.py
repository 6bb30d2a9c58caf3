"""A real gRPC service for the HTTP/2 tests: `shop.proto` compiled by grpcio-tools at test time,
served by grpcio on 127.0.0.1 port 0.

`ShopServer(variant=...)` is the primary (`variant=""`) or a changed shadow (`variant="v2"`
names every item differently, a changed field the comparison should find). It counts the calls
it got per method, so a test can check that the shadow got every copy.

Methods: `Get` (unary; id "missing" answers NOT_FOUND, `delay_ms` sleeps so a deadline can pass),
`List` (server streaming: `count` items) and `Upload` (client streaming: a summary of the items).
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections import Counter
from concurrent import futures
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Self

import grpc

PROTO = """
syntax = "proto3";
package shop;

message GetRequest { string id = 1; int32 delay_ms = 2; }
message Item { string id = 1; string name = 2; int64 price = 3; }
message ListRequest { int32 count = 1; }
message Summary { int32 count = 1; int64 total = 2; }

service Shop {
  rpc Get(GetRequest) returns (Item);
  rpc List(ListRequest) returns (stream Item);
  rpc Upload(stream Item) returns (Summary);
}
"""

_compiled: tuple[ModuleType, ModuleType] | None = None
_lock = threading.Lock()


def compile_shop(tmp: Path) -> tuple[ModuleType, ModuleType]:
    """(`shop_pb2`, `shop_pb2_grpc`), compiled once per session into `tmp`."""
    global _compiled
    with _lock:
        if _compiled is not None:
            return _compiled
        from grpc_tools import protoc  # type: ignore[import-untyped]

        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "shop.proto").write_text(PROTO)
        rc = protoc.main(
            ["protoc", f"-I{tmp}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", "shop.proto"]
        )
        assert rc == 0, "protoc failed"
        sys.path.insert(0, str(tmp))
        try:
            pb2 = importlib.import_module("shop_pb2")
            pb2_grpc = importlib.import_module("shop_pb2_grpc")
        finally:
            sys.path.remove(str(tmp))
        _compiled = (pb2, pb2_grpc)
        return _compiled


class ShopServer:
    """grpcio serving Shop on 127.0.0.1:0 (h2c, as grpcio's insecure port is)."""

    def __init__(self, modules: tuple[ModuleType, ModuleType], variant: str = "") -> None:
        self.pb2, self.pb2_grpc = modules
        self.variant = variant
        self.calls: Counter[str] = Counter()
        self.uploaded: list[int] = []
        self._cond = threading.Condition()
        self.port = 0
        self._server: Any = None

    def _count(self, method: str) -> None:
        with self._cond:
            self.calls[method] += 1
            self._cond.notify_all()

    def wait_calls(self, method: str, n: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.calls[method] < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{method}: {self.calls[method]} call(s) after {timeout}s, wanted {n}"
                    )
                self._cond.wait(left)
            return self.calls[method]

    def _name(self, item_id: str) -> str:
        return f"item {item_id}" + (f" ({self.variant})" if self.variant else "")

    def Get(self, request: Any, context: Any) -> Any:
        self._count("Get")
        if request.delay_ms:
            time.sleep(request.delay_ms / 1000)
        if request.id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no item missing")
        return self.pb2.Item(id=request.id, name=self._name(request.id), price=len(request.id))

    def List(self, request: Any, context: Any) -> Any:
        self._count("List")
        for i in range(request.count):
            yield self.pb2.Item(id=str(i), name=self._name(str(i)), price=i)

    def Upload(self, request_iterator: Any, context: Any) -> Any:
        self._count("Upload")
        count = total = 0
        for item in request_iterator:
            count += 1
            total += item.price
        with self._cond:
            self.uploaded.append(count)
        return self.pb2.Summary(count=count, total=total)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.pb2_grpc.add_ShopServicer_to_server(self, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait(5)
