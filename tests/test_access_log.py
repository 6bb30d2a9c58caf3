"""The access log line carries the shadow outcomes of its request (docs/operations.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from support.backend import RecordingBackend
from support.client import get
from support.configs import backend_entry
from support.control import started
from support.proxy import ProxyFactory
from support.wait import wait_until

T = 5.0


def test_access_log_line_lists_shadow_outcomes(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    primary, s = backends(), backends()
    cfg: dict[str, Any] = {
        "access_log": True,
        "backends": {"p": backend_entry(primary.url), "s": backend_entry(s.url)},
        "routes": [
            {
                "name": "never",
                "match": {"path_prefix": "/never"},
                "backend": "p",
                "shadows": [{"backend": "s", "percent": 0}],
            },
            {
                "name": "copied",
                "match": {"path_prefix": "/"},
                "backend": "p",
                "shadows": [{"backend": "s", "percent": 100}],
            },
        ],
    }
    proxy = started(proxy_factory, cfg)
    assert get(proxy.port, "/copied", [("X-Request-Id", "log-1")]).status == 200
    assert get(proxy.port, "/never", [("X-Request-Id", "log-2")]).status == 200
    s.wait_for_requests(1)
    got = wait_until(
        lambda: len(proxy.access_log()) >= 2 and proxy.access_log(), T, "two access log lines"
    )
    by_id = {line["request_id"]: line for line in got}
    copied, never = by_id["log-1"], by_id["log-2"]
    assert (copied["route"], copied["backend"], copied["status"]) == ("copied", "p", 200)
    assert copied.get("shadows") == {"s": "sent"}, copied
    assert never["route"] == "never"
    assert "shadows" not in never or never["shadows"] == {}, never  # sampled out: not listed
