"""The ``httpbin`` fixture override registered by :mod:`.requests_via_proxy` (see there why).

Kept in its own module because pytest collects fixtures per registered plugin object: this one
must be registered *after* pytest-httpbin, the ``-p`` module itself is loaded before it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest

from .proxy import ProxyProcess, basic_config

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _Counter:
    """WSGI middleware counting what reaches the upstream httpbin, and how much was proxied."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.total = 0
        self.with_forwarded_for = 0

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        with self.lock:
            self.total += 1
            if "HTTP_X_FORWARDED_FOR" in environ:
                self.with_forwarded_for += 1
        return self.app(environ, start_response)


class ProxiedHttpbin:
    """Quacks like ``pytest_httpbin.serve.Server`` but its address is the proxy's."""

    protocol = "http"

    def __init__(self, upstream: Any, proxy: ProxyProcess) -> None:
        self.upstream = upstream
        self.proxy = proxy
        self.host = proxy.host
        self.port = proxy.port

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.host}:{self.port}"

    def join(self, url: str, allow_fragments: bool = True) -> str:
        return urljoin(self.url, url, allow_fragments=allow_fragments)

    def __add__(self, other: str) -> str:
        return self.url + other


@pytest.fixture(scope="session")
def httpbin(httpbin: Any, pytestconfig: pytest.Config) -> Iterator[ProxiedHttpbin]:
    """pytest-httpbin's server with a shadowlane proxy in front; yields the proxy's address."""
    counter = _Counter(httpbin._server.get_app())
    httpbin._server.set_app(counter)
    workers = int(pytestconfig.getoption("shadowlane_workers", 1) or 1)
    config = basic_config(httpbin.url, timeout="60s")
    with ProxyProcess(config, workers=workers) as proxy:
        yield ProxiedHttpbin(httpbin, proxy)
        report_path = os.environ.get("SHADOWLANE_SUITE_REPORT")
        alive = proxy.alive()
        returncode = proxy.stop()
        if report_path:
            report = {
                "proxy_url": proxy.url,
                "upstream_url": httpbin.url,
                "upstream_requests": counter.total,
                "upstream_requests_with_x_forwarded_for": counter.with_forwarded_for,
                "proxy_alive_at_end": alive,
                "proxy_returncode": returncode,
                "proxy_stderr_tail": proxy.stderr_text()[-4000:],
            }
            Path(report_path).write_text(json.dumps(report, indent=2))
