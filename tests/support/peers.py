"""Running the proxy on peers' documents (`run -c DIR --services FILE`), and a keep-alive
client that can set the method, Host and headers of each request.

The documents are written as given, byte for byte, into a directory of their own beside a
small native `listen.yaml` (loopback port 0 for both listeners), which is the "mixed with
native config" case and keeps the peers' text unchanged. Backends are named in the peers'
words and mapped to real loopback servers by the `--services` file.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from .backend import Recorded, RecordingBackend
from .proxy import LOOPBACK, HttpResponse, ProxyProcess, read_http_response


def sigma_bound(n: int, p: float, sigmas: float = 4.5) -> float:
    """Half-width of the acceptance band for a Binomial(n, p) count (0 when p is 0 or 1)."""
    return sigmas * math.sqrt(n * p * (1 - p))


def within(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= max(sigma_bound(n, p), 0.0) + 1e-9


class PeerProxy(ProxyProcess):
    """``shadowlane run -c <dir> --services <file>`` on ``documents`` (file name -> text)."""

    def __init__(
        self,
        documents: dict[str, str],
        services: dict[str, Any],
        *,
        extra_args: list[str] | None = None,
        native: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__({}, **kwargs)
        self.routes_dir = self.dir / "routes"
        self.routes_dir.mkdir()
        listen = {"listen": f"{LOOPBACK}:0", "admin": {"listen": f"{LOOPBACK}:0"}}
        listen.update(native or {})
        (self.routes_dir / "listen.yaml").write_text(yaml.safe_dump(listen, sort_keys=False))
        for name, text in documents.items():
            (self.routes_dir / name).write_text(text)
        self.services_path = self.dir / "services.yaml"
        self.services_path.write_text(yaml.safe_dump(services, sort_keys=False))
        self.peer_args = list(extra_args or [])

    @property
    def command(self) -> list[str]:
        cmd = super().command
        cmd[cmd.index(str(self.config_path))] = str(self.routes_dir)
        return [*cmd, "--services", str(self.services_path), *self.peer_args]


class Client:
    """One keep-alive connection; every request is bounded by ``timeout``."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)

    def request(
        self,
        target: str,
        *,
        method: str = "GET",
        host: str = "shadowlane.test",
        headers: Iterable[tuple[str, str]] = (),
    ) -> HttpResponse:
        head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers)
        if method in ("POST", "PUT"):
            head += "Content-Length: 2\r\n\r\n{}"
        else:
            head += "\r\n"
        self.sock.sendall(head.encode())
        resp = read_http_response(self.sock, method, timeout=self.timeout)
        if (resp.header("connection") or "").lower() == "close":
            self.sock.close()
            self.sock = socket.create_connection((LOOPBACK, self.port), timeout=self.timeout)
        return resp

    def close(self) -> None:
        self.sock.close()


def wait_count(
    backend: RecordingBackend, n: int, timeout: float = 10.0, what: str = ""
) -> list[Recorded]:
    """Wait until ``backend`` holds at least ``n`` requests; returns them."""
    deadline = time.monotonic() + timeout
    while True:
        got = backend.requests
        if len(got) >= n:
            return got
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what or 'backend'}: {len(got)} of {n} requests")
        time.sleep(0.02)


def services_for(backends: dict[str, RecordingBackend]) -> dict[str, list[str]]:
    """A `--services` map: each peer's name -> the loopback server standing in for it."""
    return {name: [f"http://{LOOPBACK}:{b.port}"] for name, b in backends.items()}


def count_where(backend: RecordingBackend, pred: Callable[[Recorded], bool]) -> int:
    return sum(1 for r in backend.requests if pred(r))


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
