"""Helpers for the migration tests: the admin API of a running proxy, read and called from the
outside, and a bounded background load.

Like the rest of ``support``, nothing here imports ``shadowlane``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from .proxy import ProxyProcess

TOKEN = "migrate-test-token"
TOKEN_ENV = "SHADOWLANE_TEST_TOKEN"
ENV = {TOKEN_ENV: TOKEN}


def admin_json(proxy: ProxyProcess, path: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(proxy.admin_url + path, timeout=timeout) as resp:
        return json.loads(resp.read())


def admin_call(
    proxy: ProxyProcess, method: str, path: str, body: Any = None, *, token: str | None = TOKEN
) -> tuple[int, Any]:
    """A mutating admin call with the bearer token; (status, decoded JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(proxy.admin_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def migration(proxy: ProxyProcess, name: str) -> dict[str, Any]:
    found: dict[str, Any] = admin_json(proxy, f"/api/migrations/{name}")
    return found


class Load:
    """Requests sent in a background thread over keep-alive connections to several proxies in
    turn, bounded by `max_requests` and `max_seconds`. `request(i)` gives (method, path, body)
    for the i-th request; answers are counted by status."""

    def __init__(
        self,
        proxies: list[ProxyProcess],
        request: Callable[[int], tuple[str, str, bytes | None]],
        *,
        max_requests: int = 20_000,
        max_seconds: float = 60.0,
        pause: float = 0.002,
    ) -> None:
        self.proxies = proxies
        self.request = request
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.pause = pause
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        conns = [http.client.HTTPConnection(p.host, p.port, timeout=10) for p in self.proxies]
        deadline = time.monotonic() + self.max_seconds
        try:
            while (
                not self._stop.is_set()
                and self.sent < self.max_requests
                and time.monotonic() < deadline
            ):
                i = self.sent
                conn = conns[i % len(conns)]
                method, path, body = self.request(i)
                try:
                    conn.request(
                        method, path, body=body, headers={"Content-Type": "application/json"}
                    )
                    resp = conn.getresponse()
                    resp.read()
                    self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
                except (OSError, http.client.HTTPException) as err:
                    self.errors.append(repr(err))
                    conn.close()
                self.sent += 1
                if self.pause:
                    time.sleep(self.pause)
        finally:
            for c in conns:
                c.close()

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
