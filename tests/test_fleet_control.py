"""Runtime control shared by a fleet: two real proxies on one real PostgreSQL store.

A percent change and a pause made through one instance's admin API are in force on the other
within 2 s, while a bounded load goes through both: the other's `/api/config` shows the new
value, and its shadow stops copying (its `sent` counter stops while it keeps answering).

An instance whose store goes away (its PostgreSQL stopped) keeps the state it last applied,
keeps serving, and says so in `/healthz` (200, JSON with `store: unreachable`) and `/metrics`
(`shadowlane_store_reachable 0`).
"""

from __future__ import annotations

import functools
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from support.backend import RecordingBackend
from support.fleet import ENV, TOKEN_ENV, Load, admin_call, admin_json
from support.metrics import scrape
from support.proxy import ProxyProcess
from support.wait import wait_until
from test_store import PgCluster, _pg_bin, pg_cluster, pg_url  # noqa: F401  (fixtures)

#: the bound of the issue: a change anywhere is in force everywhere within this
IN_FORCE = 2.0


def shadow_config(primary: str, shadow: str, store: str) -> dict[str, Any]:
    return {
        "admin": {"token_env": TOKEN_ENV},
        "backends": {"p": {"endpoints": [primary]}, "s": {"endpoints": [shadow]}},
        "routes": [
            {
                "name": "api",
                "match": {"path_prefix": "/"},
                "backends": [{"backend": "p", "weight": 100}, {"backend": "s", "weight": 0}],
                "shadows": [{"backend": "s", "percent": 100, "compare": True}],
            }
        ],
        "compare": {"store": store},
    }


def live_shadow(proxy: ProxyProcess) -> dict[str, Any]:
    route = admin_json(proxy, "/api/config")["routes"][0]
    found: dict[str, Any] = route["shadows"][0]
    return found


def sent(proxy: ProxyProcess) -> float:
    return scrape(proxy).sum("shadowlane_shadow_requests_total", route="api", outcome="sent")


def answered(proxy: ProxyProcess) -> float:
    return scrape(proxy).sum("shadowlane_requests_total", route="api")


def assert_copies_stopped(proxy: ProxyProcess) -> None:
    """While the load keeps going through `proxy`, its shadow copies nothing more."""
    time.sleep(0.3)  # copies decided before the change may still be counted
    copies, requests = sent(proxy), answered(proxy)
    wait_until(lambda: answered(proxy) >= requests + 50, 10.0, "50 more answers under load")
    assert sent(proxy) == copies


def test_percent_and_pause_made_on_one_instance_apply_on_the_other(pg_url: str) -> None:  # noqa: F811
    with RecordingBackend() as primary, RecordingBackend() as shadow:
        cfg = shadow_config(primary.url, shadow.url, pg_url)
        with (
            ProxyProcess(cfg, env=ENV) as a,
            ProxyProcess(cfg, env=ENV) as b,
            Load([a, b], lambda i: ("GET", f"/x/{i}", None), max_seconds=90) as load,
        ):
            wait_until(lambda: sent(b) > 20, 10.0, "b copying under load")
            code, body = admin_call(a, "PUT", "/api/routes/api/shadows/s/percent", {"percent": 0})
            assert code == 200, body
            t0 = time.monotonic()
            wait_until(lambda: live_shadow(b)["percent"] == 0.0, IN_FORCE, "percent 0 on b")
            assert time.monotonic() - t0 < IN_FORCE
            assert_copies_stopped(b)
            runtime = admin_json(b, "/api/config")["runtime"]
            assert runtime["percent"] == {"api/s": 0.0}

            code, _ = admin_call(a, "PUT", "/api/routes/api/shadows/s/percent", {"percent": 100})
            assert code == 200
            wait_until(lambda: live_shadow(b)["percent"] == 100.0, IN_FORCE, "percent 100 on b")
            copies = sent(b)
            wait_until(lambda: sent(b) > copies + 10, 10.0, "b copying again")

            code, _ = admin_call(a, "POST", "/api/routes/api/shadows/s/pause")
            assert code == 200
            t0 = time.monotonic()
            wait_until(lambda: live_shadow(b)["paused"] is True, IN_FORCE, "paused on b")
            assert time.monotonic() - t0 < IN_FORCE
            assert_copies_stopped(b)

            # and the other way round: a weight change on b is in force on a
            code, _ = admin_call(
                b, "PUT", "/api/routes/api/weights", {"weights": {"p": 50, "s": 50}}
            )
            assert code == 200
            wait_until(
                lambda: admin_json(a, "/api/config")["routes"][0]["weights"] == {"p": 50, "s": 50},
                IN_FORCE,
                "50/50 on a",
            )
            # two changes of different keys at once, one on each instance: both hold on both
            import threading

            calls = [
                threading.Thread(
                    target=admin_call,
                    args=(a, "PUT", "/api/routes/api/shadows/s/percent", {"percent": 30}),
                ),
                threading.Thread(
                    target=admin_call,
                    args=(b, "PUT", "/api/routes/api/weights", {"weights": {"p": 70, "s": 30}}),
                ),
            ]
            for t in calls:
                t.start()
            for t in calls:
                t.join(10)
            for proxy in (a, b):
                wait_until(
                    functools.partial(
                        lambda p: (
                            admin_json(p, "/api/config")["routes"][0]["weights"]
                            == {"p": 70, "s": 30}
                            and live_shadow(p)["percent"] == 30.0
                            and live_shadow(p)["paused"] is True
                        ),
                        proxy,
                    ),
                    IN_FORCE,
                    f"both changes (and the earlier pause) on {proxy.admin_url}",
                )
            assert load.sent > 100 and not load.errors and set(load.statuses) == {200}


def test_an_instance_that_loses_its_store_keeps_serving_on_its_last_state(tmp_path: Path) -> None:
    bindir = _pg_bin()
    assert bindir is not None
    cluster = PgCluster(bindir).start()
    stopped = False
    try:
        url = cluster.create_db()
        with RecordingBackend() as primary, RecordingBackend() as shadow:
            cfg = shadow_config(primary.url, shadow.url, url)
            cfg["migrations"] = [
                {
                    "name": "m",
                    "old": "p",
                    "new": "s",
                    "interval": "300ms",
                    "stages": [{"name": "hold", "gates": {"min_time": "1h"}}],
                }
            ]
            with ProxyProcess(cfg, env=ENV) as proxy:
                wait_until(
                    lambda: admin_json(proxy, "/api/migrations")["migrations"], 5.0, "migration m"
                )
                code, _ = admin_call(
                    proxy, "PUT", "/api/routes/api/weights", {"weights": {"p": 0, "s": 100}}
                )
                assert code == 200
                assert scrape(proxy).sum("shadowlane_store_reachable") == 1.0
                with urllib.request.urlopen(proxy.admin_url + "/healthz", timeout=5) as r:
                    assert (r.status, r.read()) == (200, b"ok\n")
                cluster.stop()
                stopped = True
                wait_until(
                    lambda: scrape(proxy).sum("shadowlane_store_reachable") == 0.0,
                    15.0,
                    "the store reported lost",
                )
                with urllib.request.urlopen(proxy.admin_url + "/healthz", timeout=5) as r:
                    health = json.loads(r.read())
                    assert r.status == 200
                assert health["status"] == "ok" and health["store"] == "unreachable"
                assert health["degraded"] is True and health["since"] > 0
                # it serves, on the weights it had: every answer from s
                before = len(shadow.requests)
                with urllib.request.urlopen(proxy.url + "/still", timeout=10) as r:
                    assert r.status == 200
                assert len(shadow.requests) > before
                assert admin_json(proxy, "/api/config")["routes"][0]["weights"] == {
                    "p": 0,
                    "s": 100,
                }
                assert proxy.stderr_lines("store unreachable")
                # the migration's last known state is still shown, marked stale; moving it
                # needs the store, and says so
                (m,) = admin_json(proxy, "/api/migrations")["migrations"]
                assert (m["position"], m["stale"]) == ("hold", True)
                code, body = admin_call(proxy, "POST", "/api/migrations/m/advance")
                assert code == 503 and "store unreachable" in body["error"]
    finally:
        if not stopped:
            cluster.stop()


def test_the_other_instance_takes_over_driving_when_the_driver_stops(pg_url: str) -> None:  # noqa: F811
    with RecordingBackend() as primary, RecordingBackend() as shadow:
        cfg = shadow_config(primary.url, shadow.url, pg_url)
        cfg["migrations"] = [
            {
                "name": "m",
                "old": "p",
                "new": "s",
                "interval": "300ms",
                "stages": [
                    {"name": "hold", "gates": {"min_time": "1h"}},
                    {"name": "flip", "weights": [100]},
                ],
            }
        ]
        a = ProxyProcess(cfg, env=ENV).start()
        try:
            with ProxyProcess(cfg, env=ENV) as b:
                driver = wait_until(
                    lambda: next((p for p in (a, b) if p.stderr_lines("drives it now")), None),
                    10.0,
                    "one instance driving",
                )
                other = b if driver is a else a
                assert not other.stderr_lines("drives it now")
                driver.stop()  # a clean stop hands the lease over at once
                wait_until(lambda: other.stderr_lines("drives it now"), 5.0, "the takeover")
                # and the survivor still moves it
                code, body = admin_call(other, "POST", "/api/migrations/m/advance")
                assert code == 200 and body["to"] == "flip@100%"
                wait_until(
                    lambda: (
                        admin_json(other, "/api/config")["routes"][0]["weights"]
                        == {"p": 0, "s": 100}
                    ),
                    IN_FORCE,
                    "the flip in force",
                )
        finally:
            a.close()
