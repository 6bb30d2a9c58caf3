"""The divergence ledger read from outside: `GET /api/ledger` and `shadowlane report`.

The ledger is seeded through the Store API into a real SQLite file (`seed_ledger`): these tests
are about everything from the record on; which copies diverge is the shadow pipeline's, tested
there. Two layers:

- the API on a real admin server (uvloop, sockets) over the real store: parameters, filters,
  validation, the empty ledger without a store, a failing store;
- the real proxy process (`python -m shadowlane run`) with ordered shadows and that store file
  in its config: it opens the store although nothing compares, serves the ledger, declares the
  divergence series at zero; and `python -m shadowlane report` prints the ledger, as text and
  as JSON.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from shadowlane.admin import AdminApp
from shadowlane.admin.comparisons import install_comparison_api
from shadowlane.admin.ledger import MAX_LEDGER_LIMIT, MAX_SUSPECT_KEYS
from shadowlane.metrics import DIVERGENCE_REASONS, Metrics
from shadowlane.store import Batch, Divergence, LedgerQueries, Store, open_store
from support.backend import RecordingBackend
from support.configs import backend_entry, basic_config
from support.metrics import scrape
from support.proxy import ProxyProcess
from support.servers import LoopThread
from support.wait import wait_until

TIMEOUT = 5.0

# -- the seeded ledger ----------------------------------------------------------------------------

#: what `seed_ledger` leaves open, as the API lists it: newest first
OPEN_IDS = ["req-5", "req-3", "req-2", "req-1"]
#: open entries per (route, target, reason)
OPEN_COUNTS = [
    {"route": "es-bulk", "target": "es8", "reason": "bulk_item", "n": 1},
    {"route": "es-bulk", "target": "es8", "reason": "dropped", "n": 1},
    {"route": "es-bulk", "target": "es8", "reason": "timeout", "n": 1},
    {"route": "es-index", "target": "es8", "reason": "status_mismatch", "n": 1},
]
SUSPECT_KEYS = ["logs", "logs/7", "orders/1", "orders/2", "orders/3"]


def seed_ledger(url: str) -> float:
    """Write five entries to the store at `url`, a second apart, and resolve the fourth one's
    only key; returns when the first was recorded."""
    t0 = time.time() - 60

    def entry(n: int, route: str, reason: str, keys: tuple[str, ...], detail: str) -> Divergence:
        return Divergence(
            ts=t0 + n,
            route=route,
            target="es8",
            scope="es-writes",
            reason=reason,
            keys=keys,
            request_id=f"req-{n}",
            method="POST",
            uri="/_bulk" if route == "es-bulk" else "/logs/_doc/1",
            detail=detail,
        )

    batch = Batch()
    batch.divergences += [
        entry(1, "es-bulk", "dropped", ("orders/1", "orders/2"), "lane queue full"),
        entry(2, "es-bulk", "timeout", ("orders/3",), "no answer in 5s"),
        entry(3, "es-bulk", "bulk_item", ("logs/7",), "item 0: version_conflict_engine_exception"),
        entry(4, "es-bulk", "dropped", ("orders/9",), "lane queue full"),
        entry(5, "es-index", "status_mismatch", ("logs",), "primary 200, target 400"),
    ]
    with open_store(url) as store:
        store.write(batch)
        assert store.resolve_keys(["orders/9"], ts=t0 + 30) == 1
    return t0


def ordered_config(store_url: str, primary: str, shadow: str) -> dict[str, Any]:
    """Two routes whose shadows to es8 are ordered in one scope, and `compare.store`: the
    proxy must open that store for the ledger although nothing compares."""
    order = {"scope": "es-writes", "keys": ["path"]}
    return {
        "backends": {"es7": backend_entry(primary), "es8": backend_entry(shadow)},
        "routes": [
            {
                "name": "es-bulk",
                "match": {"path_regex": "/_bulk$"},
                "backend": "es7",
                "shadows": [{"backend": "es8", "order": order}],
            },
            {
                "name": "es-index",
                "match": {"path_prefix": "/"},
                "backend": "es7",
                "shadows": [{"backend": "es8", "order": order}],
            },
        ],
        "compare": {"store": store_url, "flush_interval": "50ms"},
    }


# -- the API on a real admin server ---------------------------------------------------------------


class Server:
    """An AdminApp serving the ledger of `ledger`, on a uvloop loop in a daemon thread."""

    def __init__(self, ledger: LedgerQueries | None) -> None:
        self.loop_thread = LoopThread("uvloop", timeout=TIMEOUT * 3).start()
        self.app = AdminApp(Metrics())
        install_comparison_api(self.app, None, ledger=ledger)
        server = self.loop_thread.run(self.app.start("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    def get(self, query: str = "") -> requests.Response:
        return requests.get(f"{self.url}/api/ledger{query}", timeout=TIMEOUT)

    def close(self) -> None:
        self.loop_thread.run(self.app.close(grace=1.0))
        self.loop_thread.stop(TIMEOUT)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path}/ledger.db"
    seed_ledger(url)
    with open_store(url) as s:
        yield s


@pytest.fixture
def server(store: Store) -> Iterator[Server]:
    s = Server(store)
    yield s
    s.close()


def request_ids(doc: dict[str, Any]) -> list[str]:
    return [e["request_id"] for e in doc["entries"]]


def test_the_whole_open_ledger(server: Server) -> None:
    r = server.get()
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    doc = r.json()
    assert set(doc) == {"entries", "counts", "suspect_keys", "suspect_keys_truncated", "open"}
    assert request_ids(doc) == OPEN_IDS
    assert doc["counts"] == OPEN_COUNTS
    assert doc["suspect_keys"] == SUSPECT_KEYS and doc["suspect_keys_truncated"] is False
    assert doc["open"] == 4
    first = doc["entries"][-1]
    assert first == {
        "id": first["id"],
        "ts": first["ts"],
        "route": "es-bulk",
        "target": "es8",
        "scope": "es-writes",
        "reason": "dropped",
        "keys": ["orders/1", "orders/2"],
        "request_id": "req-1",
        "method": "POST",
        "uri": "/_bulk",
        "detail": "lane queue full",
        "resolved_at": None,
    }
    assert isinstance(first["id"], int) and isinstance(first["ts"], float)


def test_filters(server: Server) -> None:
    doc = server.get("?route=es-index").json()
    assert request_ids(doc) == ["req-5"]
    assert doc["counts"] == OPEN_COUNTS[3:] and doc["suspect_keys"] == ["logs"]
    assert doc["open"] == 1

    doc = server.get("?route=es-bulk&target=es8&reason=dropped").json()
    assert request_ids(doc) == ["req-1"]
    assert doc["counts"] == [OPEN_COUNTS[1]] and doc["open"] == 1
    # suspect keys are narrowed by route, target and scope (a key has no reason of its own)
    assert doc["suspect_keys"] == ["logs/7", "orders/1", "orders/2", "orders/3"]

    assert request_ids(server.get("?scope=es-writes&limit=2").json()) == OPEN_IDS[:2]
    nothing = server.get("?scope=other").json()
    assert nothing == {
        "entries": [],
        "counts": [],
        "suspect_keys": [],
        "suspect_keys_truncated": False,
        "open": 0,
    }
    assert server.get("?target=es9").json()["open"] == 0


def test_resolved_entries_on_request(server: Server) -> None:
    doc = server.get("?resolved=1").json()
    assert request_ids(doc) == ["req-5", "req-4", "req-3", "req-2", "req-1"]
    resolved = {e["request_id"]: e["resolved_at"] for e in doc["entries"]}
    assert isinstance(resolved.pop("req-4"), float)
    assert set(resolved.values()) == {None}
    # counts, keys and `open` stay about what is open
    assert doc["counts"] == OPEN_COUNTS and doc["open"] == 4
    assert "orders/9" not in doc["suspect_keys"]
    assert request_ids(server.get("?resolved=0").json()) == OPEN_IDS


@pytest.mark.parametrize(
    ("query", "param", "expected"),
    [
        ("?reason=lost", "reason", "must be one of dropped, skipped_body"),
        ("?limit=0", "limit", f"must be an integer 1..{MAX_LEDGER_LIMIT}"),
        (f"?limit={MAX_LEDGER_LIMIT + 1}", "limit", "must be an integer"),
        ("?limit=ten", "limit", "must be an integer"),
        ("?resolved=yes", "resolved", "must be 1 or 0"),
        ("?route=", "route", "must not be empty"),
        ("?reasons=dropped", "reasons", "unknown parameter; one of route, target, scope"),
    ],
)
def test_bad_parameters_are_400_naming_them(
    server: Server, query: str, param: str, expected: str
) -> None:
    r = server.get(query)
    assert r.status_code == 400
    body = r.json()
    assert body["error"].startswith(f"{param}: ") and expected in body["error"]
    assert body["param"] == param


def test_suspect_keys_are_capped(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/many.db"
    keys = tuple(f"idx/{i:05d}" for i in range(MAX_SUSPECT_KEYS + 5))
    batch = Batch()
    batch.divergences.append(
        Divergence(time.time(), "r", "t", "s", "dropped", keys, "req", "POST", "/_bulk")
    )
    with open_store(url) as store:
        store.write(batch)
        server = Server(store)
        try:
            doc = server.get().json()
        finally:
            server.close()
    assert doc["suspect_keys"] == sorted(keys)[:MAX_SUSPECT_KEYS]
    assert doc["suspect_keys_truncated"] is True
    assert doc["entries"][0]["keys"] == list(keys)  # the entry itself keeps all its keys
    assert doc["open"] == 1


def test_without_a_store_the_ledger_is_empty_not_an_error() -> None:
    server = Server(None)
    try:
        r = server.get("?route=x")
        assert r.status_code == 200
        assert r.json() == {
            "entries": [],
            "counts": [],
            "suspect_keys": [],
            "suspect_keys_truncated": False,
            "open": 0,
        }
        assert server.get("?limit=0").status_code == 400  # parameters are still checked
    finally:
        server.close()


def test_a_failing_store_is_503_and_the_admin_server_goes_on(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/closed.db")
    store.close()  # every query fails now
    server = Server(store)
    try:
        r = server.get()
        assert r.status_code == 503
        assert r.json()["error"].startswith("comparison store failed: ")
        assert requests.get(server.url + "/healthz", timeout=TIMEOUT).status_code == 200
    finally:
        server.close()


# -- the real proxy and `shadowlane report` -------------------------------------------------------


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[str, float]:
    url = f"sqlite:///{tmp_path}/ledger.db"
    return url, seed_ledger(url)


def test_a_proxy_with_ordered_shadows_serves_its_ledger(
    seeded: tuple[str, float], proxy_factory: Callable[..., ProxyProcess]
) -> None:
    url, t0 = seeded
    with RecordingBackend() as es7, RecordingBackend() as es8:
        proxy = proxy_factory(ordered_config(url, es7.url, es8.url))
        doc = requests.get(f"{proxy.admin_url}/api/ledger", timeout=TIMEOUT).json()
        assert request_ids(doc) == OPEN_IDS
        assert doc["counts"] == OPEN_COUNTS
        assert doc["suspect_keys"] == SUSPECT_KEYS and doc["open"] == 4
        assert doc["entries"][0]["ts"] == pytest.approx(t0 + 5)
        r = requests.get(f"{proxy.admin_url}/api/ledger?reason=nope", timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["param"] == "reason"

        # every reason of each ordered shadow exists at zero before anything diverges, and the
        # ledger's own drops too
        metrics = scrape(proxy)
        for route in ("es-bulk", "es-index"):
            reasons = metrics.by("reason", "shadowlane_divergences_total", route=route)
            assert reasons == dict.fromkeys(DIVERGENCE_REASONS, 0.0)
            dropped = metrics.select("shadowlane_ledger_dropped_total", route=route, target="es8")
            assert [s.value for s in dropped] == [0.0]
        assert [s.value for s in metrics.select("shadowlane_ledger_queued")] == [0.0]


def test_a_proxy_without_a_store_has_an_empty_ledger(
    proxy_factory: Callable[..., ProxyProcess],
) -> None:
    with RecordingBackend() as backend:
        proxy = proxy_factory(basic_config(backend.url))
        r = requests.get(f"{proxy.admin_url}/api/ledger", timeout=TIMEOUT)
        assert r.status_code == 200
        assert r.json()["entries"] == [] and r.json()["open"] == 0
        assert list(proxy.dir.glob("*.db")) == []  # and it opened no store to say so


def test_a_reload_that_orders_a_shadow_opens_the_store_for_its_ledger(
    seeded: tuple[str, float], proxy_factory: Callable[..., ProxyProcess]
) -> None:
    url, _ = seeded
    with RecordingBackend() as es7, RecordingBackend() as es8:
        config = ordered_config(url, es7.url, es8.url)
        unordered = copy.deepcopy(config)
        for route in unordered["routes"]:
            route["shadows"] = [{"backend": "es8"}]
        proxy = proxy_factory(unordered)
        assert requests.get(f"{proxy.admin_url}/api/ledger", timeout=TIMEOUT).json()["open"] == 0
        assert scrape(proxy).select("shadowlane_divergences_total") == []

        proxy.write_config(config)
        proxy.reload()

        def ledger_open() -> int:
            doc = requests.get(f"{proxy.admin_url}/api/ledger", timeout=TIMEOUT).json()
            return int(doc["open"])

        wait_until(lambda: ledger_open() == 4, TIMEOUT, "the reloaded proxy to serve the ledger")
        reasons = scrape(proxy).by("reason", "shadowlane_divergences_total", route="es-bulk")
        assert reasons == dict.fromkeys(DIVERGENCE_REASONS, 0.0)


def report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shadowlane", "report", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_report_prints_the_ledger(seeded: tuple[str, float], tmp_path: Path) -> None:
    url, _ = seeded
    config = tmp_path / "c.yaml"
    unused = "http://127.0.0.1:9"  # report reads the store only
    config.write_text(orjson.dumps(ordered_config(url, unused, unused)).decode())
    done = report("-c", str(config))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("no comparisons recorded yet\n")
    lines = text.splitlines()
    assert "divergence ledger: 4 open entries" in lines
    bulk = lines.index("es-bulk -> es8: 3 open entries, 4 suspect key(s), 1 resolved")
    assert [line.split() for line in lines[bulk + 1 : bulk + 6]] == [
        ["reason", "entries"],
        ["---------", "-------"],
        ["bulk_item", "1"],
        ["dropped", "1"],
        ["timeout", "1"],
    ]
    assert lines[bulk + 6 : bulk + 11] == [
        "  suspect keys:",
        "    logs/7",
        "    orders/1",
        "    orders/2",
        "    orders/3",
    ]
    index = lines.index("es-index -> es8: 1 open entry, 1 suspect key(s), 0 resolved")
    assert "    logs" in lines[index:]

    done = report("--store", url, "--format", "json")
    assert done.returncode == 0, done.stderr
    ledger = orjson.loads(done.stdout)["ledger"]
    assert ledger == {
        "open": 4,
        "targets": [
            {
                "route": "es-bulk",
                "target": "es8",
                "open": 3,
                "resolved": 1,
                "reasons": {"bulk_item": 1, "dropped": 1, "timeout": 1},
                "suspect_keys": ["logs/7", "orders/1", "orders/2", "orders/3"],
            },
            {
                "route": "es-index",
                "target": "es8",
                "open": 1,
                "resolved": 0,
                "reasons": {"status_mismatch": 1},
                "suspect_keys": ["logs"],
            },
        ],
    }


def test_report_shows_a_fully_resolved_target_and_caps_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    keys = tuple(f"idx/{i:02d}" for i in range(13))
    batch = Batch()
    batch.divergences += [
        Divergence(time.time(), "bulk", "v2", "s", "error", keys, "a", "POST", "/_bulk"),
        Divergence(time.time(), "other", "v2", "s", "timeout", ("x/1",), "b", "PUT", "/x/_doc/1"),
    ]
    with open_store(url) as store:
        store.write(batch)
        store.resolve_keys(["x/1"])
    done = report("--store", url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "divergence ledger: 1 open entry" in lines
    start = lines.index("bulk -> v2: 1 open entry, 13 suspect key(s), 0 resolved")
    shown = lines[start + 5 : start + 15]
    assert shown == [f"    idx/{i:02d}" for i in range(10)]
    assert lines[start + 15] == "    ... and 3 more (--format json)"
    assert "other -> v2: no divergences open (1 resolved)" in lines
