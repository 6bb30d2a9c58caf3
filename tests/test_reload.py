"""Hot reload end to end: SIGHUP and `POST /api/reload` while the proxy serves.

Every test runs the real `shadowlane run` subprocess (conftest `proxy_factory`) in front of real
loopback backends (conftest `backends`). What each proves:

- a SIGHUP reload under keep-alive load loses no request and drops no client connection, and a
  request waiting for an upstream connection when the pools are swapped is still served;
- a reload that turns on `compare` makes and stores comparisons from then on;
- a config that fails validation is refused (errors on stderr, 422 from the API) and the old one
  keeps serving; a later valid one takes effect, also across `--workers 2`; restart-only keys
  are kept with a warning.
"""

from __future__ import annotations

import copy
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from support.backend import Recorded, RecordingBackend, Reply, dead_port, named
from support.client import InFlight, KeepAlive, get
from support.configs import backend_entry, basic_config, shadow_config
from support.control import (
    ADMIN,
    ENV,
    TOKEN_ENV,
    admin_call,
    effective,
    route_of,
    started,
)
from support.metrics import scrape
from support.migration import compared_in_report
from support.procfs import connected_to, workers_listening
from support.proxy import HttpResponse, ProxyFactory, read_http_response
from support.wait import wait_until

T = 5.0
LOOPBACK = "127.0.0.1"


# -- hot reload ---------------------------------------------------------------------------------


class LoadClient(threading.Thread):
    """Requests back to back on one keep-alive connection until told to stop (or `cap`)."""

    def __init__(self, port: int, ident: int, progress: Progress, cap: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.client_no = ident
        self.progress = progress
        self.cap = cap
        self.stop = threading.Event()
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.failures: list[str] = []
        self.connects = 0

    def run(self) -> None:
        try:
            client = KeepAlive(self.port)
        except OSError as err:
            self.failures.append(f"connect: {err!r}")
            return
        try:
            while self.sent < self.cap and not self.stop.is_set():
                self.sent += 1
                try:
                    resp = client.get(f"/load/{self.client_no}/{self.sent}")
                except (OSError, ValueError) as err:  # reset, closed, timed out, garbage
                    self.failures.append(f"request {self.sent}: {err!r}")
                    client.reconnect()
                    continue
                self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
                self.progress.add()
        except OSError as err:
            self.failures.append(f"reconnect: {err!r}")
        finally:
            self.connects = client.connects
            client.close()


class Progress:
    """Answers received by all load clients, waited on through a condition variable."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.done = 0

    def add(self) -> None:
        with self.cond:
            self.done += 1
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.done >= n, timeout):
                raise TimeoutError(f"only {self.done} of {n} answers within {timeout}s")


def test_reload_under_load_loses_no_request_and_drops_no_connection(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    """8 keep-alive clients send back to back while the config is rewritten and SIGHUP'd five
    times (shadow percent changed, shadow removed and re-added, a route added each time).
    Every request is answered 2xx, the backend sees exactly as many, and no client connection
    was closed by the proxy."""
    primary, shadow = backends(), backends()

    def variant(gen: int, percent: float | None) -> dict[str, Any]:
        catch_all: dict[str, Any] = {"name": "main", "match": {"path_prefix": "/"}, "backend": "p"}
        if percent is not None:
            catch_all["shadows"] = [{"backend": "s", "percent": percent}]
        return {
            "listen": proxy.config["listen"],
            "admin": proxy.config["admin"],
            "backends": {"p": backend_entry(primary.url), "s": backend_entry(shadow.url)},
            "routes": [
                {"name": f"gen-{gen}", "match": {"path": f"/gen-{gen}"}, "backend": "p"},
                catch_all,
            ],
        }

    start_cfg = shadow_config({"p": primary.url, "s": shadow.url}, route="main")
    proxy = started(proxy_factory, start_cfg)
    progress = Progress()
    clients = [LoadClient(proxy.port, i, progress, cap=2000) for i in range(8)]
    for c in clients:
        c.start()
    percents: list[float | None] = [50, None, 100, 25, None]
    sent_at_reload = []
    try:
        for gen, percent in enumerate(percents, start=1):
            progress.wait_for(gen * 300, timeout=10)
            proxy.write_config(variant(gen, percent))
            sent_at_reload.append(progress.done)
            proxy.reload()
            wait_until(
                lambda gen=gen: f"gen-{gen}" in {rc["name"] for rc in effective(proxy)["routes"]},
                T,
                f"reload {gen} to take effect",
            )
            shadows = route_of(effective(proxy), "main")["shadows"]
            assert [s["percent"] for s in shadows] == ([] if percent is None else [percent])
        # keep the load on past the last reload (and to 2,000 answers at least), then stop
        progress.wait_for(max(progress.done + 200, 2000), timeout=10)
        assert all(c.is_alive() for c in clients), "a client reached its cap before the reloads"
    finally:
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(T)
    assert not any(c.is_alive() for c in clients), "a load client hung"

    failures = [f for c in clients for f in c.failures]
    assert failures == [], failures[:10]
    sent = sum(c.sent for c in clients)
    statuses: dict[int, int] = {}
    for c in clients:
        for status, n in c.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    assert statuses == {200: sent}, statuses
    assert sent >= 2000, sent
    reconnects = sum(c.connects - 1 for c in clients)
    assert reconnects == 0, f"the proxy closed {reconnects} client keep-alive connection(s)"
    # the backend records a request before answering it: all are there by now
    got = [r for r in primary.requests if r.path.startswith("/load/")]
    assert len(got) == sent, f"backend got {len(got)} requests for {sent} answered"
    assert len({r.target for r in got}) == sent, "some request reached the backend twice"
    assert len(proxy.stderr_lines("reloaded")) == len(percents), proxy.stderr_text()
    assert shadow.requests, "the shadow got no copies"
    assert proxy.alive()
    # every reload happened while requests were flowing
    assert sent_at_reload == sorted(sent_at_reload) and sent_at_reload[-1] < sent


def test_reload_does_not_fail_a_request_waiting_for_an_upstream_connection(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    """A request accepted before a reload must be served, even when it is still waiting for a
    connection to its backend (pool at `max_connections`) when the reload swaps the pools.
    The backend closes its connection after each answer, so the waiting request has to open a
    new one from the pool it started with."""

    def closing(req: Recorded) -> Reply:
        delay = 1.0 if req.path == "/slow" else 0.0
        body = req.target.encode()
        return Reply(headers=[("Connection", "close")], body=body, delay=delay)

    primary, probe = backends(closing), backends(named("probe"))
    cfg: dict[str, Any] = {
        "backends": {
            "p": {"endpoints": [primary.url], "max_connections": 1, "connect_timeout": "5s"},
            "q": backend_entry(probe.url),
        },
        "routes": [
            {"name": "probe", "match": {"path": "/probe"}, "backend": "q"},
            {"name": "main", "match": {"path_prefix": "/"}, "backend": "p"},
        ],
    }
    proxy = started(proxy_factory, cfg)
    slow = InFlight(proxy.port, "/slow")
    slow.start()
    primary.wait_for_requests(1)  # /slow holds p's only connection for 1 s
    with socket.create_connection((LOOPBACK, proxy.port), timeout=T) as queued:
        queued.sendall(b"GET /queued HTTP/1.1\r\nHost: ops.test\r\n\r\n")
        # answered after /queued was sent: the proxy has read /queued, which waits for p
        assert get(proxy.port, "/probe").body == b"probe"
        new = copy.deepcopy(proxy.config)
        new["routes"].insert(0, {"name": "added", "match": {"path": "/added"}, "backend": "q"})
        proxy.write_config(new)
        proxy.reload()
        wait_until(lambda: proxy.stderr_lines("reloaded"), T, "the reload")
        assert slow.is_alive(), "/slow finished before the reload (test setup too slow)"
        resp = read_http_response(queued, timeout=T)
    assert (resp.status, resp.body) == (200, b"/queued"), (resp.status, resp.body)
    slow.join(T)
    assert isinstance(slow.result, HttpResponse) and slow.result.status == 200, slow.result


def test_reload_that_turns_on_compare_records_comparisons(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """The migration runbook's second step: the proxy runs with a plain shadow, then a reload
    adds `compare: true`. Comparisons must then be made and stored, as if the file had said so
    at start (counted in /metrics, written to the store, shown by `shadowlane report`)."""
    primary, candidate = backends(), backends()
    store = f"sqlite:///{tmp_path / 'compare.db'}"
    cfg = shadow_config({"p": primary.url, "s": candidate.url}, route="api")
    cfg["compare"] = {"store": store, "flush_interval": "200ms"}
    proxy = started(proxy_factory, cfg)
    assert get(proxy.port, "/before").status == 200
    candidate.wait_for_requests(1)
    comparing = copy.deepcopy(proxy.config)
    comparing["routes"][0]["shadows"][0]["compare"] = True
    proxy.write_config(comparing)
    proxy.reload()
    wait_until(lambda: proxy.stderr_lines("reloaded"), T, "the reload")
    for i in range(5):
        assert get(proxy.port, f"/same/{i}").status == 200
    candidate.wait_for_requests(6)

    def compared() -> float:
        return scrape(proxy).sum("shadowlane_comparisons_total", route="api", target="s")

    try:
        wait_until(lambda: compared() >= 5, T, "5 comparisons counted in /metrics")
    finally:
        assert proxy.stop() == 0, proxy.stderr_text()
    assert compared_in_report(store, "api", "s") == 5


# -- bad reloads --------------------------------------------------------------------------------


def test_bad_reload_keeps_serving_and_a_good_one_takes_effect(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    one, two, shadow = backends(named("one")), backends(named("two")), backends()
    good = shadow_config(
        {"one": one.url, "two": two.url, "s": shadow.url}, route="main", primary="one", admin=ADMIN
    )
    proxy = started(proxy_factory, good, env=ENV)
    good = copy.deepcopy(proxy.config)
    client = KeepAlive(proxy.port)
    assert client.get("/a").body == b"one"
    before = effective(proxy)

    bad_percent = copy.deepcopy(good)
    bad_percent["routes"][0]["shadows"][0]["percent"] = 150
    proxy.write_config(bad_percent)
    proxy.reload()
    refused = wait_until(
        lambda: proxy.stderr_lines("reload refused"), T, "the refused reload on stderr"
    )
    assert any("routes[0].shadows[0].percent" in line for line in refused), refused
    assert client.get("/b").body == b"one"
    assert get(proxy.port, "/c").body == b"one"
    assert effective(proxy) == before

    unknown = copy.deepcopy(good)
    unknown["routes"][0]["backend"] = "nope"
    proxy.write_config(unknown)
    proxy.reload()
    refused = wait_until(
        lambda: [x for x in proxy.stderr_lines("reload refused") if "nope" in x],
        T,
        "the second refused reload on stderr",
    )
    assert any("routes[0].backend" in line for line in refused), refused
    assert client.get("/d").body == b"one"
    assert effective(proxy) == before

    r = admin_call(proxy, "POST", "/api/reload")
    assert r.status_code == 422, (r.status_code, r.text)
    assert "routes[0].backend" in r.json()["error"] and "nope" in r.json()["error"], r.json()
    assert client.get("/e").body == b"one"
    assert effective(proxy) == before
    assert len(proxy.stderr_lines("reloaded")) == 0

    fixed = copy.deepcopy(good)
    fixed["routes"][0]["backend"] = "two"
    proxy.write_config(fixed)
    r = admin_call(proxy, "POST", "/api/reload")
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.json() == {"reloaded": True}
    # the same keep-alive connection now reaches the new backend
    assert client.get("/f").body == b"two"
    assert get(proxy.port, "/g").body == b"two"
    assert route_of(effective(proxy), "main")["backend"] == "two"
    assert client.connects == 1
    client.close()
    assert proxy.alive()


def test_api_reload_with_workers_reaches_both_and_refuses_a_bad_config(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    """`POST /api/reload` with `--workers 2`: a valid file is applied by both workers; an
    invalid one is refused with 422 and its errors, as with one process."""
    one, two = backends(named("one")), backends(named("two"))
    cfg: dict[str, Any] = {
        "admin": {"token_env": TOKEN_ENV},
        "backends": {"one": backend_entry(one.url), "two": backend_entry(two.url)},
        "routes": [{"name": "main", "match": {"path_prefix": "/"}, "backend": "one"}],
    }
    proxy = started(proxy_factory, cfg, workers=2, env=ENV)
    pids = workers_listening(proxy, 2, T)
    to_two = copy.deepcopy(proxy.config)
    to_two["routes"][0]["backend"] = "two"
    proxy.write_config(to_two)
    r = admin_call(proxy, "POST", "/api/reload")
    assert r.status_code == 200, (r.status_code, r.text)
    wait_until(lambda: len(proxy.stderr_lines("reloaded")) == 2, T, "both workers to reload")
    with ThreadPoolExecutor(8) as ex:
        bodies = list(ex.map(lambda i: get(proxy.port, f"/after/{i}").body, range(64)))
    assert set(bodies) == {b"two"}
    served = connected_to(pids, two.port)
    assert all(served.values()), f"not every worker served (test setup): {served}"

    bad = copy.deepcopy(to_two)
    bad["routes"][0]["backend"] = "nope"
    proxy.write_config(bad)
    r = admin_call(proxy, "POST", "/api/reload")
    assert r.status_code == 422, (r.status_code, r.text)
    assert "routes[0].backend" in r.json()["error"], r.json()
    assert {get(proxy.port, f"/bad/{i}").body for i in range(16)} == {b"two"}


def test_reload_keeps_restart_only_keys_with_a_warning(
    backend: RecordingBackend, proxy_factory: ProxyFactory
) -> None:
    """`listen` (and admin, access_log, compare.store) only change on restart: a reload that
    changes them keeps the old value, says so, and applies the rest of the file."""
    proxy = started(proxy_factory, basic_config(backend.url))
    new = copy.deepcopy(proxy.config)
    new_port = dead_port()  # bound by this test, never listening: a refused connect proves it
    new["listen"] = f"{LOOPBACK}:{new_port}"
    new["routes"].insert(0, {"name": "added", "match": {"path": "/added"}, "backend": "b1"})
    proxy.write_config(new)
    proxy.reload()
    warned = wait_until(lambda: proxy.stderr_lines("reload: listen"), T, "the listen warning")
    assert "restart" in warned[0], warned
    wait_until(lambda: proxy.stderr_lines("reloaded"), T, "the reload")
    assert "added" in {rc["name"] for rc in effective(proxy)["routes"]}
    assert get(proxy.port, "/still-here").status == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, new_port), timeout=1).close()
