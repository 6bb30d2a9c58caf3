"""`--workers 2` metrics end to end: one scrape, the sum over every worker.

Each test makes sure both workers served before it reads `/metrics` (each holds a pooled
connection to the primary, seen in /proc), so a count that only one worker's share would
satisfy cannot pass.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from support.backend import HungServer, RecordingBackend
from support.client import get
from support.configs import shadow_config
from support.control import started
from support.metrics import scrape
from support.procfs import connected_to, workers_listening
from support.proxy import ProxyFactory, ProxyProcess
from support.wait import wait_until

T = 5.0


def two_workers_served(
    proxy_factory: ProxyFactory, cfg: dict[str, Any], primary: RecordingBackend, n: int
) -> ProxyProcess:
    """A 2-worker proxy that has answered `n` GETs (12 at a time), both workers taking part."""
    proxy = started(proxy_factory, cfg, workers=2)
    pids = workers_listening(proxy, 2, T)
    with ThreadPoolExecutor(12) as ex:
        statuses = list(ex.map(lambda i: get(proxy.port, f"/w/{i}").status, range(n)))
    assert statuses == [200] * n
    served = connected_to(pids, primary.port)
    assert all(served.values()), f"not every worker served (test setup): {served}"
    return proxy


def test_workers_metrics_add_up_to_the_requests_sent(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    primary, s = backends(), backends()
    cfg = shadow_config(
        {"p": primary.url, "s": s.url}, route="api", shadows=["s", {"backend": "p", "percent": 0}]
    )
    n = 300
    proxy = two_workers_served(proxy_factory, cfg, primary, n)

    s.wait_for(lambda b: len(b.requests) == n, T)

    def totals() -> tuple[float, ...]:
        now = scrape(proxy)
        shadow = "shadowlane_shadow_requests_total"
        return (
            now.sum("shadowlane_requests_total"),
            now.sum("shadowlane_requests_total", route="api", backend="p", code="200"),
            now.sum(shadow, route="api", target="s", outcome="sent"),
            now.sum(shadow, route="api", target="s", outcome="ok"),
            now.sum(shadow, route="api", target="p", outcome="sampled_out"),
            now.sum(shadow, route="api", target="p", outcome="sent"),
        )

    want = (n, n, n, n, n, 0)
    try:
        wait_until(lambda: totals() == want, T, "metrics to add up")
    except TimeoutError:
        assert totals() == want  # shows the numbers
    assert scrape(proxy).sum("shadowlane_build_info") == 1


def test_workers_gauges_add_up_over_workers(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    """Per-worker state (copies in flight) is summed over workers, not worker 0's share."""
    primary = backends()
    with HungServer() as hung:
        cfg = shadow_config(
            {"p": primary.url, "h": {"endpoints": [hung.url]}},
            route="api",
            shadows=[{"backend": "h", "percent": 100, "timeout": "60s", "max_in_flight": 200}],
        )
        n = 60
        proxy = two_workers_served(proxy_factory, cfg, primary, n)
        hung.wait_for_connections(n, T)  # every copy is in flight, in one worker or the other

        def in_flight() -> float:
            return scrape(proxy).sum("shadowlane_shadow_in_flight", route="api", target="h")

        try:
            wait_until(lambda: in_flight() == n, T, "in-flight copies summed over workers")
        except TimeoutError:
            assert in_flight() == n  # shows the number


def test_a_killed_worker_is_restarted_and_the_other_keeps_serving(
    backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    """`kill -9` of one of two workers under load: every request sent on a fresh connection
    meanwhile is answered (the kernel gives new connections to the live listener; only the
    dead worker's in-flight ones may fail), and a new worker takes its place."""
    import os
    import signal
    import threading

    from support.configs import basic_config

    proxy = started(proxy_factory, basic_config(backend.url), workers=2)
    pids = workers_listening(proxy, 2, T)
    victim, survivor = pids[0], pids[1]
    results: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set() and i < 5000:
            i += 1
            try:
                results.append(get(proxy.port, f"/load/{i}", timeout=T).status)
            except OSError as err:  # a connection the dead worker had accepted
                failures.append(err)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(results) >= 50, T, "load running")
    os.kill(victim, signal.SIGKILL)
    new = wait_until(
        lambda: [p for p in proxy.worker_pids() if p not in pids] or None, 2 * T, "a new worker"
    )
    assert survivor in proxy.worker_pids()
    workers_listening(proxy, 2, T)
    before = len(results)
    wait_until(lambda: len(results) >= before + 100, 2 * T, "load served after the restart")
    stop.set()
    for t in threads:
        t.join(T)
    assert set(results) == {200}
    # only connections the killed worker held can fail: the one each load thread had in
    # flight, and a few the kernel queued on its listener until its exit closed it
    assert len(failures) <= 3 * len(threads), failures
    assert proxy.alive()
    assert "restarting it" in proxy.stderr_text()
    assert len(new) == 1

    # the admin listener (worker 0's) answers whichever worker died
    def admin_answers() -> bool:
        try:
            return scrape(proxy).sum("shadowlane_requests_total") > 0
        except OSError:
            return False  # a restarted worker 0 binds the admin port just after the listener

    wait_until(admin_answers, T, "admin answers")
