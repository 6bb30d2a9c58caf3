"""The runtime control API end to end: weights, shadow percent, pause/resume, and who may call.

Every test runs the real `shadowlane run` subprocess in front of real loopback backends. What
each proves:

- a runtime weight flip moves all traffic within one second, also across `--workers 2`;
- mutating admin calls need the bearer token (401 without or wrong, 403 when none configured);
- shadow percent and pause/resume at runtime, shown in `GET /api/config`, gone after a reload,
  and a paused shadow still accounts for every request in `/metrics`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from support.backend import RecordingBackend, named
from support.client import KeepAlive, get
from support.configs import backend_entry, shadow_config
from support.control import (
    ADMIN,
    AUTH,
    ENV,
    TOKEN,
    TOKEN_ENV,
    admin_call,
    effective,
    route_of,
    started,
)
from support.metrics import scrape
from support.procfs import connected_to, workers_listening
from support.proxy import ProxyFactory, ProxyProcess
from support.wait import wait_until

T = 5.0


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
    assert len(proxy.stderr_lines("reloaded")) == 0
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
    wait_until(lambda: proxy.stderr_lines("reloaded"), T, "the reload")
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
