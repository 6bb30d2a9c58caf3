"""Graceful drain end to end: SIGTERM with primaries and shadow copies in flight.

All in-flight primaries finish, copies finish or hit their short drain deadline, comparisons
reach the store, and the process exits 0 in time.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

from support.backend import RecordingBackend, Reply
from support.client import InFlight
from support.configs import shadow_config
from support.control import started
from support.migration import compared_in_report
from support.proxy import HttpResponse, ProxyFactory

T = 5.0


def test_sigterm_finishes_primaries_and_shadow_copies_and_flushes_comparisons(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    primary, candidate = backends(), backends()
    store = f"sqlite:///{tmp_path / 'compare.db'}"
    cfg = shadow_config({"p": primary.url, "s": candidate.url}, route="api")
    cfg["routes"][0]["shadows"][0]["compare"] = True
    cfg["compare"] = {"store": store, "flush_interval": "1m", "batch": 1000}
    proxy = started(proxy_factory, cfg)
    flights = [InFlight(proxy.port, f"/delay/0.6?i={i}") for i in range(6)]
    for f in flights:
        f.start()
    primary.wait_for_requests(6)
    candidate.wait_for_requests(6)  # the copies are at the candidate, unanswered
    start = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    for f in flights:
        f.join(T)
        assert isinstance(f.result, HttpResponse), (f.target, f.result)
        assert f.result.status == 200, (f.target, f.result.status)
        assert json.loads(f.result.body)["target"] == f.target
    assert proxy.wait(10) == 0, proxy.stderr_text()
    assert time.monotonic() - start < 5.0
    assert "Traceback" not in proxy.stderr_text(), proxy.stderr_text()

    # flush_interval 1m and batch 1000: only the drain can have written these
    assert compared_in_report(store, "api", "s") == 6


def test_sigterm_gives_hung_shadow_copies_a_short_deadline(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    """Copies to a shadow that never answers must not hold the exit beyond their deadline
    (`min(5s, drain_timeout)`); primaries in flight still finish; exit 0."""
    primary = backends()
    hung = backends(lambda _req: Reply(action="hang"))
    cfg = shadow_config(
        {"p": primary.url, "h": {"endpoints": [hung.url], "timeout": "30s"}},
        route="api",
        shadows=[{"backend": "h", "percent": 100, "timeout": "30s"}],
        limits={"drain_timeout": "1s"},
    )
    proxy = started(proxy_factory, cfg)
    flights = [InFlight(proxy.port, f"/delay/0.3?i={i}") for i in range(3)]
    for f in flights:
        f.start()
    hung.wait_for_requests(3)
    primary.wait_for_requests(3)
    start = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(T) == 0, proxy.stderr_text()
    elapsed = time.monotonic() - start
    assert elapsed < 3.0, f"exit took {elapsed:.2f}s with hung shadow copies"
    for f in flights:
        f.join(T)
        assert isinstance(f.result, HttpResponse) and f.result.status == 200, f.result
