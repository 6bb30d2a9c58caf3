"""The flip's gates through the real proxy: a new backend that starts failing 5% of its requests
during a weight step is rolled back to the last good step within the step's window, by itself,
and the audit log says so with the figures.

Two real backends (tests/support/backend.py) behind one proxy with a SQLite store; a bounded
background load goes through the proxy the whole time. The new backend answers 500 to every
20th request once told to.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from support.backend import Recorded, RecordingBackend, Reply
from support.fleet import ENV, TOKEN_ENV, Load, admin_call, admin_json, migration
from support.proxy import ProxyProcess
from support.wait import wait_until

#: how long each step must hold; the rollback must come within it
STEP = 6.0


class Failing:
    """A handler: 200, or a 500 for every 20th request while `on`."""

    def __init__(self) -> None:
        self.on = False
        self.n = 0
        self.failed = 0
        self.lock = threading.Lock()

    def __call__(self, req: Recorded) -> Reply:
        with self.lock:
            self.n += 1
            fail = self.on and self.n % 20 == 0
            if fail:
                self.failed += 1
        if fail:
            return Reply(500, [("content-type", "text/plain")], b"boom")
        return Reply(200, [("content-type", "text/plain")], b"new")


def flip_config(old: str, new: str, store: str) -> dict[str, Any]:
    return {
        "admin": {"token_env": TOKEN_ENV},
        "backends": {"old": {"endpoints": [old]}, "new": {"endpoints": [new]}},
        "routes": [
            {
                "name": "api",
                "match": {"path_prefix": "/"},
                "backends": [{"backend": "old", "weight": 100}, {"backend": "new", "weight": 0}],
            }
        ],
        "compare": {"store": store},
        "migrations": [
            {
                "name": "api-flip",
                "old": "old",
                "new": "new",
                "auto": True,
                "interval": "200ms",
                "stages": [
                    {
                        "name": "flip",
                        "weights": [20, 50, 100],
                        "gates": {
                            "step_time": f"{STEP}s",
                            "max_error_rate": "1%",
                            "min_requests": 20,
                        },
                    }
                ],
            }
        ],
    }


def weights(proxy: ProxyProcess) -> dict[str, int]:
    routes = admin_json(proxy, "/api/config")["routes"]
    found: dict[str, int] = routes[0]["weights"]
    return found


def test_a_failing_flip_step_rolls_back_to_the_last_good_step(tmp_path: Path) -> None:
    failing = Failing()
    with (
        RecordingBackend(lambda r: Reply(200, [("content-type", "text/plain")], b"old")) as old,
        RecordingBackend(failing) as new,
    ):
        cfg = flip_config(old.url, new.url, f"sqlite:///{tmp_path}/store.db")
        with (
            ProxyProcess(cfg, env=ENV) as proxy,
            Load([proxy], lambda i: ("GET", f"/item/{i}", None), max_seconds=60),
        ):
            st = wait_until(
                lambda: (m := migration(proxy, "api-flip"))["position"] == "flip@50%" and m,
                STEP + 5,
                "the 50% step",
            )
            assert st["phase"] == "running"
            wait_until(lambda: weights(proxy) == {"old": 50, "new": 50}, 2.0, "50/50 in force")
            before = new.requests and len(new.requests)
            failing.on = True
            started = time.monotonic()
            st = wait_until(
                lambda: (m := migration(proxy, "api-flip"))["phase"] == "halted" and m,
                STEP,
                "the automatic rollback",
            )
            took = time.monotonic() - started
            assert st["position"] == "flip@20%", st
            assert took < STEP, took
            assert failing.failed >= 1 and len(new.requests) > before
            wait_until(lambda: weights(proxy) == {"old": 80, "new": 20}, 2.0, "80/20 again")
            # it stays there (halted): nothing moves it on by itself
            time.sleep(1.0)
            assert migration(proxy, "api-flip")["position"] == "flip@20%"
        # the audit log, read after the instance is gone: from the store, via the CLI's JSON
        import json
        import subprocess
        import sys

        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "shadowlane",
                "migrate",
                "status",
                "api-flip",
                "--format",
                "json",
                "--store",
                f"sqlite:///{tmp_path}/store.db",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        audit = json.loads(out.stdout)["audit"]
        rollback = audit[0]
        assert (rollback["action"], rollback["actor"]) == ("auto-rollback", "auto")
        assert (rollback["from"], rollback["to"]) == ("flip@50%", "flip@20%")
        assert "max_error_rate" in rollback["reason"]
        gate = next(g for g in rollback["gates"] if g["gate"] == "max_error_rate")
        assert gate["verdict"] == "fail" and gate["value"] > 1.0 and gate["threshold"] == 1.0
        assert [a["action"] for a in audit[1:]] == ["advance", "start"]


def test_a_person_resumes_a_halted_flip_and_rolls_back_with_to(tmp_path: Path) -> None:
    """advance on a halted migration resumes it where it stands; rollback --to goes back."""
    with RecordingBackend() as old, RecordingBackend() as new:
        cfg = flip_config(old.url, new.url, f"sqlite:///{tmp_path}/store.db")
        cfg["migrations"][0]["auto"] = False
        cfg["migrations"][0]["stages"].insert(0, {"name": "warm", "gates": {"min_time": "1h"}})
        with ProxyProcess(cfg, env=ENV) as proxy:
            assert migration(proxy, "api-flip")["position"] == "warm"
            assert (
                admin_call(proxy, "POST", "/api/migrations/api-flip/advance", token=None)[0] == 401
            )
            code, body = admin_call(
                proxy, "POST", "/api/migrations/api-flip/advance", {"by": "ann"}
            )
            assert code == 200 and body == {
                "migration": "api-flip",
                "from": "warm",
                "to": "flip@20%",
            }
            wait_until(lambda: weights(proxy) == {"old": 80, "new": 20}, 2.0, "80/20")
            code, body = admin_call(
                proxy, "POST", "/api/migrations/api-flip/rollback", {"to": "nope"}
            )
            assert code == 409 and "no stage 'nope'" in body["error"]
            code, body = admin_call(
                proxy, "POST", "/api/migrations/api-flip/rollback", {"to": "warm"}
            )
            assert code == 200 and body["to"] == "warm"
            wait_until(lambda: weights(proxy) == {"old": 100, "new": 0}, 2.0, "back to the file's")
            st = migration(proxy, "api-flip")
            assert st["phase"] == "halted"
            assert [(a["action"], a["actor"]) for a in st["audit"][:2]] == [
                ("rollback", "admin"),
                ("advance", "admin:ann"),
            ]
            code, body = admin_call(proxy, "POST", "/api/migrations/api-flip/advance")
            assert code == 200 and (body["from"], body["to"]) == ("warm", "warm")
            assert migration(proxy, "api-flip")["phase"] == "running"
            assert admin_call(proxy, "POST", "/api/migrations/nope/advance")[0] == 404


def test_with_workers_every_worker_applies_the_migration(tmp_path: Path) -> None:
    """Worker 0 follows the shared state; the other workers get it through control's state
    file: after an advance to 100%, every answer on fresh connections (spread over the workers
    by the kernel) comes from the new backend."""
    from support.backend import named

    with RecordingBackend(named("old")) as old, RecordingBackend(named("new")) as new:
        cfg = flip_config(old.url, new.url, f"sqlite:///{tmp_path}/store.db")
        cfg["migrations"][0]["auto"] = False
        cfg["migrations"][0]["stages"] = [
            {"name": "hold", "gates": {"min_time": "1h"}},
            {"name": "flip", "weights": [100]},
        ]
        with ProxyProcess(cfg, env=ENV, workers=2) as proxy:
            assert len(proxy.worker_pids()) == 2
            code, body = admin_call(proxy, "POST", "/api/migrations/api-flip/advance")
            assert code == 200 and body["to"] == "flip@100%"
            import urllib.request

            def answers() -> set[bytes]:
                seen = set()
                for i in range(40):  # a new connection each: both workers answer some
                    with urllib.request.urlopen(f"{proxy.url}/w/{i}", timeout=5) as r:
                        seen.add(r.read())
                return seen

            wait_until(lambda: answers() == {b"new"}, 3.0, "every worker on the new backend")
            code, body = admin_call(proxy, "POST", "/api/migrations/api-flip/rollback")
            assert code == 200 and body["to"] == "flip@0%"
            wait_until(lambda: answers() == {b"old"}, 3.0, "every worker back on the old one")


def test_a_reload_keeps_the_migrations_position_and_forgets_a_persons_override(
    tmp_path: Path,
) -> None:
    """The file declares the plan, the store holds the position: after SIGHUP the weights of
    the position are in force again on the new routes, while a person's override (SQLite: per
    instance) goes, as every runtime change does at a reload."""
    with RecordingBackend() as old, RecordingBackend() as new:
        cfg = flip_config(old.url, new.url, f"sqlite:///{tmp_path}/store.db")
        cfg["migrations"][0]["auto"] = False
        cfg["routes"][0]["shadows"] = [{"backend": "new", "percent": 5}]
        with ProxyProcess(cfg, env=ENV) as proxy:
            assert weights(proxy) == {"old": 80, "new": 20}  # the first step, before ready
            code, _ = admin_call(
                proxy, "PUT", "/api/routes/api/shadows/new/percent", {"percent": 50}
            )
            assert code == 200
            proxy.reload()
            wait_until(lambda: proxy.stderr_lines("reloaded"), 10.0, "the reload")
            wait_until(lambda: weights(proxy) == {"old": 80, "new": 20}, 2.0, "80/20 after reload")
            shadow = admin_json(proxy, "/api/config")["routes"][0]["shadows"][0]
            assert shadow["percent"] == 5.0
            code, body = admin_call(proxy, "POST", "/api/migrations/api-flip/advance")
            assert code == 200 and body["to"] == "flip@50%"
            wait_until(lambda: weights(proxy) == {"old": 50, "new": 50}, 2.0, "50/50")
