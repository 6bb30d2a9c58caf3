"""Operations end to end (issue 6): hot reload, runtime control, multi-worker metrics, drain.

Every test runs the real `shadowlane run` subprocess (conftest `proxy_factory`) in front of real
loopback backends (`support.backend.RecordingBackend`). What each proves:

- a SIGHUP reload under keep-alive load loses no request and drops no client connection;
- a runtime weight flip moves all traffic within one second, also across `--workers 2`;
- a config that fails validation is refused (errors on stderr, 422 from the API) and the old one
  keeps serving; a later valid one takes effect; restart-only keys are kept with a warning;
- mutating admin calls need the bearer token (401 without or wrong, 403 when none configured);
- shadow percent and pause/resume at runtime, shown in `GET /api/config`, gone after a reload;
- `--workers 2`: `/metrics` counters are the sum over workers;
- SIGTERM with primaries and shadow copies in flight: all finish, comparisons reach the store;
- the access log line carries the shadow outcomes.
"""

from __future__ import annotations

import copy
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from support.backend import HungServer, Recorded, RecordingBackend, Reply, dead_port
from support.configs import backend_entry, basic_config, shadow_config
from support.metrics import scrape
from support.procfs import connected_to, workers_listening
from support.proxy import HttpResponse, ProxyProcess, read_http_response
from support.wait import wait_until

T = 5.0
LOOPBACK = "127.0.0.1"
TOKEN_ENV = "SHADOWLANE_TEST_ADMIN_TOKEN"
TOKEN = "ops-test-token-5f1c"
ENV = {TOKEN_ENV: TOKEN}
#: the admin section that makes the control API check the bearer token TOKEN
ADMIN = {"token_env": TOKEN_ENV}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ProxyFactory = Callable[..., ProxyProcess]


def started(proxy_factory: ProxyFactory, config: dict[str, Any], **kw: Any) -> ProxyProcess:
    """A started proxy whose admin API answers too: the harness only waits for `listen`, and
    the admin listener opens a moment later."""
    proxy = proxy_factory(config, **kw)

    def admin_up() -> bool:
        try:
            return requests.get(proxy.admin_url + "/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(admin_up, T, "the admin listener")
    return proxy


# -- helpers ------------------------------------------------------------------------------------


def named(name: str) -> Callable[[Recorded], Reply]:
    """A handler answering `name` as the body: which backend served a request, at a glance."""
    body = name.encode()

    def handler(_req: Recorded) -> Reply:
        return Reply(headers=[("Content-Type", "text/plain")], body=body)

    return handler


@pytest.fixture
def backends() -> Iterator[Callable[..., RecordingBackend]]:
    """`make(handler=None) -> RecordingBackend`, started; all stopped (and checked) at teardown."""
    made: list[RecordingBackend] = []

    def make(handler: Callable[[Recorded], Reply] | None = None) -> RecordingBackend:
        b = RecordingBackend(handler)
        made.append(b)
        return b.start()

    yield make
    for b in made:
        b.stop()
    for b in made:
        assert b.errors == [], f"RecordingBackend raised: {b.errors!r}"


def get(port: int, target: str, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    """One request on a fresh connection."""
    head = f"GET {target} HTTP/1.1\r\nHost: ops.test\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers or [])
    with socket.create_connection((LOOPBACK, port), timeout=T) as sock:
        sock.sendall(head.encode() + b"\r\n")
        return read_http_response(sock, timeout=T)


class KeepAlive:
    """One client keep-alive connection; counts how often it had to reconnect."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connects = 0
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        self.connects += 1
        return socket.create_connection((LOOPBACK, self.port), timeout=T)

    def get(self, target: str) -> HttpResponse:
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: ops.test\r\n\r\n".encode())
        resp = read_http_response(self.sock, timeout=T)
        if (resp.header("connection") or "").lower() == "close":
            self.reconnect()
        return resp

    def reconnect(self) -> None:
        self.sock.close()
        self.sock = self._connect()

    def close(self) -> None:
        self.sock.close()


def admin_call(
    proxy: ProxyProcess,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = AUTH,
) -> requests.Response:
    return requests.request(
        method, proxy.admin_url + path, json=body, headers=headers or {}, timeout=T
    )


def effective(proxy: ProxyProcess) -> dict[str, Any]:
    r = requests.get(proxy.admin_url + "/api/config", timeout=T)
    assert r.status_code == 200, (r.status_code, r.text)
    doc: dict[str, Any] = r.json()
    return doc


def route_of(doc: dict[str, Any], name: str) -> dict[str, Any]:
    for rc in doc["routes"]:
        if rc["name"] == name:
            return dict(rc)
    raise AssertionError(f"no route {name!r} in {[rc['name'] for rc in doc['routes']]}")


def stderr_lines(proxy: ProxyProcess, needle: str) -> list[str]:
    return [line for line in proxy.stderr_text().splitlines() if needle in line]


class InFlight(threading.Thread):
    def __init__(self, port: int, target: str) -> None:
        super().__init__(daemon=True)
        self.port, self.target = port, target
        self.result: HttpResponse | BaseException | None = None

    def run(self) -> None:
        try:
            self.result = get(self.port, self.target)
        except BaseException as err:
            self.result = err


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
    assert len(stderr_lines(proxy, "reloaded")) == len(percents), proxy.stderr_text()
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
        wait_until(lambda: stderr_lines(proxy, "reloaded"), T, "the reload")
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
    wait_until(lambda: stderr_lines(proxy, "reloaded"), T, "the reload")
    for i in range(5):
        assert get(proxy.port, f"/same/{i}").status == 200
    candidate.wait_for_requests(6)

    def compared() -> float:
        return scrape(proxy).sum("shadowlane_comparisons_total", route="api", target="s")

    try:
        wait_until(lambda: compared() >= 5, T, "5 comparisons counted in /metrics")
    finally:
        assert proxy.stop() == 0, proxy.stderr_text()
    assert compared_in_report(store) == 5


def compared_in_report(store: str) -> int:
    """`shadowlane report --store URL --format json`: comparisons of route api, target c."""
    out = subprocess.run(
        [sys.executable, "-m", "shadowlane", "report", "--store", store, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rows = {(r["route"], r["target"]): r for r in json.loads(out.stdout)["comparisons"]}
    assert ("api", "s") in rows, out.stdout
    return int(rows[("api", "s")]["compared"])


# -- runtime weight flip ------------------------------------------------------------------------


def canary_config(v1: RecordingBackend, v2: RecordingBackend) -> dict[str, Any]:
    return {
        "admin": {"token_env": TOKEN_ENV},
        "backends": {"v1": backend_entry(v1.url), "v2": backend_entry(v2.url)},
        "routes": [
            {
                "name": "api",
                "match": {"path_prefix": "/"},
                "backends": [{"backend": "v1", "weight": 100}, {"backend": "v2", "weight": 0}],
            }
        ],
    }


def flip(proxy: ProxyProcess) -> float:
    """PUT weights v1 0 / v2 100; returns the monotonic time just before the call."""
    t0 = time.monotonic()
    r = admin_call(proxy, "PUT", "/api/routes/api/weights", {"weights": {"v1": 0, "v2": 100}})
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.json()["weights"] == {"v1": 0, "v2": 100}, r.json()
    return t0


def test_runtime_weight_flip_moves_traffic_within_one_second(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    v1, v2 = backends(named("v1")), backends(named("v2"))
    proxy = started(proxy_factory, canary_config(v1, v2), env=ENV)
    client = KeepAlive(proxy.port)
    try:
        assert {client.get(f"/before/{i}").body for i in range(20)} == {b"v1"}
        t0 = flip(proxy)
        first_v2 = None
        while time.monotonic() - t0 < 1.0:
            if client.get("/after").body == b"v2":
                first_v2 = time.monotonic() - t0
                break
        assert first_v2 is not None, "no request went to v2 within 1s of the flip"
        # from then on, everything: on the same keep-alive connection and on new ones
        after = [client.get(f"/settled/{i}").body for i in range(100)]
        assert set(after) == {b"v2"}, after.count(b"v1")
        assert {get(proxy.port, f"/fresh/{i}").body for i in range(20)} == {b"v2"}
        assert client.connects == 1
    finally:
        client.close()
    assert not [r for r in v1.requests if not r.path.startswith("/before/")]
    doc = effective(proxy)
    assert route_of(doc, "api")["weights"] == {"v1": 0, "v2": 100}, route_of(doc, "api")
    assert doc["runtime"]["weights"] == {"api": {"v1": 0, "v2": 100}}, doc["runtime"]


def test_runtime_weight_flip_reaches_every_worker(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    """With `--workers 2` the admin API lives in worker 0; the flip must reach worker 1 too.
    Fresh connections spread over both workers (SO_REUSEPORT); from 1 s after the flip every
    answer comes from v2, and both workers are seen talking to v2."""
    v1, v2 = backends(named("v1")), backends(named("v2"))
    proxy = started(proxy_factory, canary_config(v1, v2), workers=2, env=ENV)
    pids = workers_listening(proxy, 2, T)
    with ThreadPoolExecutor(8) as ex:
        before = list(ex.map(lambda i: get(proxy.port, f"/before/{i}").body, range(64)))
    assert set(before) == {b"v1"}
    assert all(connected_to(pids, v1.port).values()), "only one worker served (test setup)"

    answers: list[tuple[float, float, bytes]] = []  # (sent, answered, body), from the flip
    lock = threading.Lock()
    t0 = flip(proxy)

    def stream(worker: int) -> None:
        # fresh connections back to back, until 60 of them were sent from 1 s after the flip
        late = 0
        while late < 60:
            sent = time.monotonic() - t0
            body = get(proxy.port, f"/stream/{worker}/{sent:.4f}").body
            with lock:
                answers.append((sent, time.monotonic() - t0, body))
            if sent >= 1.0:
                late += 1

    with ThreadPoolExecutor(4) as ex:
        for f in [ex.submit(stream, w) for w in range(4)]:
            f.result(timeout=15)
    v2_times = [answered for _, answered, body in answers if body == b"v2"]
    assert v2_times, "no answer from v2 after the flip"
    assert min(v2_times) < 1.0, f"first v2 answer {min(v2_times):.3f}s after the flip"
    late_v1 = [(round(s, 3), body) for s, _, body in answers if s >= 1.0 and body != b"v2"]
    assert late_v1 == [], f"answers not from v2 more than 1 s after the flip: {late_v1[:10]}"
    assert len([a for a in answers if a[0] >= 1.0]) >= 240
    last_v1 = max((answered for _, answered, body in answers if body == b"v1"), default=0.0)
    assert last_v1 < 1.0, f"a v1 answer {last_v1:.3f}s after the flip"
    served_v2 = connected_to(pids, v2.port)
    assert all(served_v2.values()), f"workers without a connection to v2: {served_v2}"


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
        lambda: stderr_lines(proxy, "reload refused"), T, "the refused reload on stderr"
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
        lambda: [x for x in stderr_lines(proxy, "reload refused") if "nope" in x],
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
    assert len(stderr_lines(proxy, "reloaded")) == 0

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
    wait_until(lambda: len(stderr_lines(proxy, "reloaded")) == 2, T, "both workers to reload")
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
    warned = wait_until(lambda: stderr_lines(proxy, "reload: listen"), T, "the listen warning")
    assert "restart" in warned[0], warned
    wait_until(lambda: stderr_lines(proxy, "reloaded"), T, "the reload")
    assert "added" in {rc["name"] for rc in effective(proxy)["routes"]}
    assert get(proxy.port, "/still-here").status == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, new_port), timeout=1).close()


# -- admin API authorization --------------------------------------------------------------------


MUTATING: list[tuple[str, str, Any]] = [
    ("PUT", "/api/routes/api/weights", {"weights": {"v1": 0, "v2": 100}}),
    ("PUT", "/api/routes/api/shadows/s/percent", {"percent": 0}),
    ("POST", "/api/routes/api/shadows/s/pause", None),
    ("POST", "/api/routes/api/shadows/s/resume", None),
    ("POST", "/api/reload", None),
]


def guarded_config(v1: RecordingBackend, v2: RecordingBackend, s: RecordingBackend) -> Any:
    cfg = canary_config(v1, v2)
    cfg["backends"]["s"] = backend_entry(s.url)
    cfg["routes"][0]["shadows"] = [{"backend": "s", "percent": 100}]
    return cfg


def test_unauthenticated_mutating_calls_are_refused(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    v1, v2, s = backends(named("v1")), backends(named("v2")), backends()
    proxy = started(proxy_factory, guarded_config(v1, v2, s), env=ENV)
    before = effective(proxy)  # GET /api/config needs no token
    wrong = [
        None,
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"X-Admin-Token": TOKEN},
    ]
    for method, path, body in MUTATING:
        for headers in wrong:
            r = admin_call(proxy, method, path, body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), r.headers
    assert effective(proxy) == before
    assert {get(proxy.port, f"/x/{i}").body for i in range(10)} == {b"v1"}
    s.wait_for_requests(10)
    assert len(stderr_lines(proxy, "reloaded")) == 0
    # the same calls with the token work (the refusals above were about the token)
    for method, path, body in MUTATING:
        r = admin_call(proxy, method, path, body)
        assert r.status_code == 200, (method, path, r.status_code, r.text)


@pytest.mark.parametrize("token_env", [None, "SHADOWLANE_TEST_UNSET_TOKEN"])
def test_mutating_calls_are_refused_when_no_token_is_configured(
    token_env: str | None,
    backends: Callable[..., RecordingBackend],
    proxy_factory: ProxyFactory,
) -> None:
    """No `admin.token_env`, or one naming an unset variable: the API is read-only (403 for
    any credentials), never open."""
    v1, v2, s = backends(named("v1")), backends(named("v2")), backends()
    cfg = guarded_config(v1, v2, s)
    if token_env is None:
        del cfg["admin"]["token_env"]
    else:
        cfg["admin"]["token_env"] = token_env
    env = {"SHADOWLANE_TEST_UNSET_TOKEN": ""}
    proxy = started(proxy_factory, cfg, env=env)
    before = effective(proxy)
    for method, path, body in MUTATING:
        for headers in (None, AUTH, {"Authorization": "Bearer "}):
            r = admin_call(proxy, method, path, body, headers=headers)
            assert r.status_code == 403, (method, path, headers, r.status_code, r.text)
    assert effective(proxy) == before
    assert {get(proxy.port, f"/x/{i}").body for i in range(5)} == {b"v1"}


# -- shadow percent, pause, resume --------------------------------------------------------------


def test_runtime_percent_and_pause_resume_are_not_persisted(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    primary, s = backends(), backends()
    cfg = shadow_config({"p": primary.url, "s": s.url}, route="api", admin=ADMIN)
    proxy = started(proxy_factory, cfg, env=ENV)
    file_before = proxy.config_path.read_text()
    client = KeepAlive(proxy.port)
    shadow_base = "/api/routes/api/shadows/s"

    def sent() -> float:
        return scrape(proxy).sum("shadowlane_shadow_requests_total", outcome="sent")

    def burst(tag: str, n: int = 10) -> None:
        for i in range(n):
            assert client.get(f"/{tag}/{i}").status == 200

    def copies(tag: str) -> list[str]:
        return [r.target for r in s.requests if r.path.startswith(f"/{tag}/")]

    def marker(tag: str) -> None:
        """A copied request after a burst: once it arrived, any copy of the burst would have."""
        assert client.get(f"/{tag}/marker").status == 200
        s.wait_for(lambda b: any(r.target == f"/{tag}/marker" for r in b.requests), T)

    burst("on")
    s.wait_for(lambda b: len(copies("on")) == 10, T)
    assert sent() == 10

    r = admin_call(proxy, "PUT", shadow_base + "/percent", {"percent": 0})
    assert r.status_code == 200 and r.json()["percent"] == 0, r.text
    doc = effective(proxy)
    assert route_of(doc, "api")["shadows"][0]["percent"] == 0
    assert doc["runtime"]["percent"] == {"api/s": 0}
    burst("zero")
    assert sent() == 10
    now = scrape(proxy)
    assert now.sum("shadowlane_shadow_requests_total", outcome="sampled_out") == 10

    r = admin_call(proxy, "POST", shadow_base + "/pause")
    assert r.status_code == 200 and r.json()["paused"] is True, r.text
    r = admin_call(proxy, "PUT", shadow_base + "/percent", {"percent": 100})
    assert r.status_code == 200, r.text
    doc = effective(proxy)
    assert route_of(doc, "api")["shadows"][0]["paused"] is True
    assert route_of(doc, "api")["shadows"][0]["percent"] == 100
    assert doc["runtime"]["paused"] == {"api/s": True}
    assert doc["runtime"]["persisted"] is False
    burst("paused")
    assert sent() == 10

    r = admin_call(proxy, "POST", shadow_base + "/resume")
    assert r.status_code == 200 and r.json()["paused"] is False, r.text
    assert route_of(effective(proxy), "api")["shadows"][0]["paused"] is False
    burst("resumed")
    s.wait_for(lambda b: len(copies("resumed")) == 10, T)
    marker("resumed")
    assert copies("zero") == [] and copies("paused") == []
    assert sent() == 21

    # runtime changes live in memory only: a reload goes back to the file
    admin_call(proxy, "PUT", shadow_base + "/percent", {"percent": 0}).raise_for_status()
    admin_call(proxy, "POST", shadow_base + "/pause").raise_for_status()
    assert proxy.config_path.read_text() == file_before
    proxy.reload()
    wait_until(lambda: stderr_lines(proxy, "reloaded"), T, "the reload")
    doc = effective(proxy)
    shadow = route_of(doc, "api")["shadows"][0]
    assert (shadow["percent"], shadow["paused"]) == (100, False), shadow
    assert doc["runtime"]["percent"] == {} and doc["runtime"]["paused"] == {}, doc["runtime"]
    burst("reloaded")
    s.wait_for(lambda b: len(copies("reloaded")) == 10, T)
    client.close()


def test_paused_shadow_still_accounts_for_every_request(
    backends: Callable[..., RecordingBackend], proxy_factory: ProxyFactory
) -> None:
    """docs/metrics.md: per (route, target), each request of the route ends in exactly one of
    sampled_out, skipped_*, dropped or a started copy. A paused shadow copies nothing, but the
    requests it did not copy must still be counted, or the copy ratio lies during a pause."""
    primary, s = backends(), backends()
    cfg = shadow_config({"p": primary.url, "s": s.url}, route="api", admin=ADMIN)
    proxy = started(proxy_factory, cfg, env=ENV)
    admin_call(proxy, "POST", "/api/routes/api/shadows/s/pause").raise_for_status()
    for i in range(10):
        assert get(proxy.port, f"/p/{i}").status == 200
    now = scrape(proxy)
    decided = sum(
        now.sum("shadowlane_shadow_requests_total", route="api", target="s", outcome=o)
        for o in ("sampled_out", "skipped_loop", "skipped_status", "skipped_body", "dropped")
    )
    copies_started = sum(
        now.sum("shadowlane_shadow_requests_total", route="api", target="s", outcome=o)
        for o in ("ok", "error", "timeout")
    )
    assert copies_started == 0 and s.requests == []
    assert decided == 10, f"10 requests while paused, {decided} accounted for"


# -- --workers 2 metrics --------------------------------------------------------------------------


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


# -- graceful drain -------------------------------------------------------------------------------


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
    assert compared_in_report(store) == 6


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


# -- access log -----------------------------------------------------------------------------------


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

    def lines() -> list[dict[str, Any]]:
        return [json.loads(x) for x in proxy.stdout_text().splitlines() if x.strip()]

    got = wait_until(lambda: len(lines()) >= 2 and lines(), T, "two access log lines")
    by_id = {line["request_id"]: line for line in got}
    copied, never = by_id["log-1"], by_id["log-2"]
    assert (copied["route"], copied["backend"], copied["status"]) == ("copied", "p", 200)
    assert copied.get("shadows") == {"s": "sent"}, copied
    assert never["route"] == "never"
    assert "shadows" not in never or never["shadows"] == {}, never  # sampled out: not listed
