"""The comparison API and dashboard files on a real admin server (127.0.0.1, uvloop).

These tests pin the HTTP side of `install_comparison_api`: paths, parameters, validation, status
codes, headers, and that a slow store never blocks the admin loop. The store here is a small
in-memory stand-in that follows the store's query contract (`summary`, `fields`, `examples`),
so a failure points at the API layer, not at the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import requests

from shadowlane.admin import AdminApp
from shadowlane.admin.comparisons import (
    MAX_EXAMPLE_LIMIT,
    ComparisonQueries,
    install_comparison_api,
)
from shadowlane.metrics import Metrics
from support.servers import LoopThread

T = TypeVar("T")
TIMEOUT = 5.0

SUMMARY = [
    {
        "route": "orders",
        "target": "orders-v2",
        "compared": 10,
        "matched": 6,
        "differing": 3,
        "noise": 1,
        "diff_rate": 0.3,
        "noise_rate": 0.1,
        "latency": {
            "primary_p50": 0.004,
            "primary_p99": 0.02,
            "shadow_p50": 0.006,
            "shadow_p99": 0.03,
        },
        "top_fields": ["body.total"],
    }
]
FIELDS = [
    {
        "field": "body.total",
        "raw": 3,
        "noise": 0,
        "raw_rate": 0.3,
        "noise_rate": 0.0,
        "reported": True,
    }
]


def example(n: int, differing: list[str]) -> dict[str, Any]:
    return {
        "request_id": f"req-{n}",
        "ts": 1700000000.0 + n,
        "method": "GET",
        "uri": f"/orders/{n}",
        "request_body": "",
        "primary": {"status": 200, "headers": [["content-type", "application/json"]], "body": "{}"},
        "candidate": {"status": 200, "headers": [], "body": "{}"},
        "differing": differing,
        "noise": [],
    }


class FakeStore:
    """Follows the store's query contract; records calls; can be made slow or broken."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.delay = 0.0
        self.fail = False
        self.threads: set[int] = set()

    def _enter(self, *call: Any) -> None:
        self.calls.append(call)
        self.threads.add(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("database is locked")

    def summary(self) -> list[dict[str, Any]]:
        self._enter("summary")
        return SUMMARY

    def fields(self, route: str, target: str) -> list[dict[str, Any]]:
        self._enter("fields", route, target)
        return FIELDS if (route, target) == ("orders", "orders-v2") else []

    def examples(
        self, route: str, target: str, field: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        self._enter("examples", route, target, field, limit)
        out = [example(1, ["body.total"]), example(2, ["status"])]
        if field is not None:
            out = [e for e in out if field in e["differing"]]
        return out[:limit]


class Server:
    """An AdminApp with the comparison API, on a uvloop loop in a daemon thread."""

    def __init__(self, store: ComparisonQueries | None) -> None:
        self.loop_thread = LoopThread("uvloop", timeout=TIMEOUT * 3).start()
        self.app = AdminApp(Metrics())
        install_comparison_api(self.app, store)
        server = self.run(self.app.start("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop_thread.run(coro)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=TIMEOUT, **kwargs)

    def close(self) -> None:
        self.run(self.app.close(grace=1.0))
        self.loop_thread.stop(TIMEOUT)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def server(store: FakeStore) -> Iterator[Server]:
    s = Server(store)
    yield s
    s.close()


def test_summary_is_the_store_summary_as_json(server: Server, store: FakeStore) -> None:
    r = server.get("/api/comparisons/summary")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    assert r.json() == SUMMARY
    assert store.calls == [("summary",)]


def test_fields_of_a_route_and_target(server: Server, store: FakeStore) -> None:
    r = server.get("/api/comparisons/orders/orders-v2/fields")
    assert r.status_code == 200
    assert r.json() == FIELDS
    assert store.calls == [("fields", "orders", "orders-v2")]


def test_path_segments_are_percent_decoded(server: Server, store: FakeStore) -> None:
    r = server.get("/api/comparisons/my%2Droute/v2.1_x/fields")
    assert r.status_code == 200
    assert r.json() == []
    assert store.calls == [("fields", "my-route", "v2.1_x")]


def test_examples_default_limit_and_no_field(server: Server, store: FakeStore) -> None:
    r = server.get("/api/comparisons/orders/orders-v2/examples")
    assert r.status_code == 200
    assert [e["request_id"] for e in r.json()] == ["req-1", "req-2"]
    assert store.calls == [("examples", "orders", "orders-v2", None, 20)]


def test_examples_field_and_limit_are_passed_through(server: Server, store: FakeStore) -> None:
    r = server.get(
        "/api/comparisons/orders/orders-v2/examples",
        params={"field": "body.items[*].id", "limit": "5"},
    )
    assert r.status_code == 200
    assert store.calls == [("examples", "orders", "orders-v2", "body.items[*].id", 5)]
    r = server.get("/api/comparisons/orders/orders-v2/examples?field=status&limit=1")
    assert [e["request_id"] for e in r.json()] == ["req-2"]


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "1.5", str(MAX_EXAMPLE_LIMIT + 1)])
def test_examples_bad_limit_is_400_and_store_not_asked(
    server: Server, store: FakeStore, limit: str
) -> None:
    r = server.get(f"/api/comparisons/orders/orders-v2/examples?limit={limit}")
    assert r.status_code == 400
    assert "limit" in r.json()["error"]
    assert store.calls == []


def test_store_queries_run_off_the_admin_loop(server: Server, store: FakeStore) -> None:
    server.get("/api/comparisons/summary")
    loop_thread = server.loop_thread.ident
    assert store.threads and loop_thread not in store.threads


def test_slow_store_does_not_block_other_admin_requests(server: Server, store: FakeStore) -> None:
    store.delay = 1.5
    results: list[requests.Response] = []
    slow = threading.Thread(target=lambda: results.append(server.get("/api/comparisons/summary")))
    slow.start()
    time.sleep(0.2)  # the slow query is now sleeping in its worker thread
    started = time.monotonic()
    health = server.get("/healthz")
    elapsed = time.monotonic() - started
    slow.join(TIMEOUT)
    assert health.status_code == 200
    assert elapsed < 0.5, f"/healthz waited {elapsed:.2f}s behind a slow store query"
    assert results[0].status_code == 200


def test_store_failure_is_503_with_a_reason(server: Server, store: FakeStore) -> None:
    store.fail = True
    r = server.get("/api/comparisons/summary")
    assert r.status_code == 503
    assert r.json() == {"error": "comparison store failed: RuntimeError"}
    # the server is fine afterwards
    store.fail = False
    assert server.get("/api/comparisons/summary").status_code == 200


def test_store_timeout_is_503(
    server: Server, store: FakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shadowlane.admin.comparisons.QUERY_TIMEOUT", 0.2)
    store.delay = 1.0
    r = server.get("/api/comparisons/orders/orders-v2/fields")
    assert r.status_code == 503
    assert r.json() == {"error": "comparison store timed out"}


def test_without_a_store_the_api_is_empty_and_the_dashboard_still_loads() -> None:
    s = Server(None)
    try:
        assert s.get("/api/comparisons/summary").json() == []
        assert s.get("/api/comparisons/a/b/fields").json() == []
        assert s.get("/api/comparisons/a/b/examples").json() == []
        assert s.get("/").status_code == 200
    finally:
        s.close()


def test_dashboard_page_and_assets(server: Server) -> None:
    page = server.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    # Relative, so the page also works behind a reverse proxy under a path prefix.
    assert '<script src="static/dashboard.js"' in page.text
    assert '<link rel="stylesheet" href="static/dashboard.css">' in page.text
    # Nothing loaded from elsewhere: the page must work with no network.
    assert "http://" not in page.text and "https://" not in page.text

    js = server.get("/static/dashboard.js")
    assert js.status_code == 200
    assert js.headers["content-type"] == "text/javascript; charset=utf-8"
    assert '"api/comparisons/summary"' in js.text
    assert "https://" not in js.text and "http://" not in js.text

    css = server.get("/static/dashboard.css")
    assert css.status_code == 200
    assert css.headers["content-type"] == "text/css; charset=utf-8"
    assert "@import" not in css.text and "url(" not in css.text


@pytest.mark.parametrize(
    "page, title, script",
    [
        ("index.html", "comparisons", "dashboard.js"),
        ("migrations.html", "migrations", "migrations.js"),
    ],
)
def test_pages_are_served_whole_with_the_shared_head(
    server: Server, page: str, title: str, script: str
) -> None:
    """Each page's first line names its title and script in the head both pages share
    (static/head.html): what is served is the whole document, its own title and script in it,
    and nothing of the placeholder line left."""
    r = server.get(f"/static/{page}")
    assert r.status_code == 200
    text = r.text
    assert text.startswith('<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">')
    assert f"<title>shadowlane · {title}</title>" in text
    assert f'<script src="static/{script}" defer></script>\n</head>\n<body>\n' in text
    assert text.count("<head>") == 1 and text.count("<body>") == 1
    assert "<!-- head" not in text and "{title}" not in text and "{script}" not in text
    assert '<header class="topbar">' in text.split("<body>", 1)[1]


@pytest.mark.parametrize(
    "path",
    [
        "/static/other.js",
        "/static/..%2Fcomparisons.py",
        "/static/",
        "/static/a/b",
        "/static/head.html",
    ],
)
def test_only_the_dashboard_files_are_served(server: Server, path: str) -> None:
    assert server.get(path).status_code == 404


def test_head_and_wrong_method(server: Server) -> None:
    head = requests.head(server.url + "/", timeout=TIMEOUT)
    assert head.status_code == 200
    assert head.content == b""
    r = requests.post(server.url + "/api/comparisons/summary", timeout=TIMEOUT)
    assert r.status_code == 405


def test_real_store_through_the_api_has_the_shapes_the_dashboard_reads(tmp_path: Any) -> None:
    """The real SQLite store, filled by the real Comparator, read through HTTP: the fields the
    dashboard uses are there, with the types it expects."""
    import json

    from shadowlane.compare import Analysis, Captured, Comparator, CompareJob, compile_settings
    from shadowlane.config import ShadowCompare
    from shadowlane.store import open_store

    def answer(body: dict[str, Any], version: bytes, seconds: float) -> Captured:
        headers = [(b"content-type", b"application/json"), (b"x-version", version)]
        return Captured(200, headers, json.dumps(body).encode(), False, seconds)

    store = open_store(f"sqlite:///{tmp_path}/c.db")
    comparator = Comparator(store, None, flush_interval=0.05).start()
    settings = compile_settings(ShadowCompare(secondary="b"))
    for n in range(10):
        comparator.submit(
            CompareJob(
                route="r1",
                target="t.2",
                request_id=f"id{n}",
                method="POST",
                uri=f"/x?n={n}",
                request_body=b'{"q": 1}',
                primary=answer({"a": 1, "u": n}, b"1", 0.002),
                candidate=answer({"a": "1", "u": n + 100}, b"2", 0.003),
                secondary=answer({"a": 1, "u": n + 200}, b"1", 0.002),
                settings=settings,
            )
        )
    assert comparator.wait_idle(TIMEOUT)
    server = Server(Analysis(store))  # what the application serves: the analysed store
    try:
        (entry,) = server.get("/api/comparisons/summary").json()
        assert (entry["route"], entry["target"], entry["compared"]) == ("r1", "t.2", 10)
        assert entry["differing"] == 10 and entry["diff_rate"] == 1.0
        for key in ("primary_p50", "primary_p99", "shadow_p50", "shadow_p99"):
            assert 0.001 < entry["latency"][key] < 0.01, (key, entry["latency"])  # seconds

        fields = {f["field"]: f for f in server.get("/api/comparisons/r1/t.2/fields").json()}
        assert fields["body.a"]["reported"] is True and fields["body.a"]["raw_rate"] == 1.0
        assert fields["body.u"]["reported"] is False and fields["body.u"]["noise_rate"] == 1.0
        assert fields["headers.x-version"]["reported"] is True

        examples = server.get("/api/comparisons/r1/t.2/examples?field=body.a&limit=3").json()
        assert len(examples) == 3
        # newest first; which requests have one is the comparison child's quota (the first
        # `examples_per_field` of each field per second), so the ids are read, not assumed
        ids = [int(e["request_id"].removeprefix("id")) for e in examples]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == 3
        ex, n = examples[0], ids[0]
        assert ex["method"] == "POST" and ex["uri"] == f"/x?n={n}"
        assert isinstance(ex["ts"], float) and ex["request_body"] == '{"q": 1}'
        assert ex["primary"]["status"] == 200
        assert ex["primary"]["headers"]["x-version"] == "1"  # a name -> value object
        assert json.loads(ex["candidate"]["body"]) == {"a": "1", "u": n + 100}  # text
        assert set(ex["differing"]) == {"body.a", "body.u", "headers.x-version"}
        assert ex["noise"] == ["body.u"]
    finally:
        server.close()
        comparator.stop()
        store.close()


def test_a_running_instance_judges_by_its_configured_thresholds(
    tmp_path: Any, proxy_factory: Any
) -> None:
    """`compare.thresholds` of the config reach the API: the store keeps counts only, and the
    instance analyses them with the thresholds it started with."""
    from shadowlane.compare import is_reported
    from support.backend import RecordingBackend, Reply
    from support.configs import shadow_config
    from support.migration import wait_for_stored

    def answer(version: bytes) -> Any:
        return lambda req: Reply(headers=[("content-type", "application/json")], body=version)

    with RecordingBackend(answer(b'{"v": 1}')) as b1, RecordingBackend(answer(b'{"v": 2}')) as b2:
        config = shadow_config(
            {"b1": b1.url, "b2": {"endpoints": [b2.url], "timeout": "5s"}},
            primary="b1",
            shadows=[{"backend": "b2", "compare": True}],
            compare={
                "store": f"sqlite:///{tmp_path}/t.db",
                "flush_interval": "50ms",
                # an absolute gap can reach 100% of the compared requests, never exceed it
                "thresholds": {"absolute": 100},
            },
        )
        proxy = proxy_factory(config)
        for n in range(3):
            assert requests.get(f"{proxy.url}/x/{n}", timeout=TIMEOUT).status_code == 200
        wait_for_stored(proxy.admin_url, 3, timeout=TIMEOUT * 2)
        fields = requests.get(f"{proxy.admin_url}/api/comparisons/r1/b2/fields", timeout=TIMEOUT)
        by_name = {f["field"]: f for f in fields.json()}
        assert (by_name["body.v"]["raw"], by_name["body.v"]["noise"]) == (3, 0)
        assert is_reported(3, 0, 3, 20.0, 0.03)  # by the default thresholds it would be
        assert by_name["body.v"]["reported"] is False
        summary = requests.get(f"{proxy.admin_url}/api/comparisons/summary", timeout=TIMEOUT)
        [row] = summary.json()
        assert (row["differing"], row["top_fields"]) == (3, [])
