"""Migrations end to end: two real proxies sharing one real PostgreSQL, in front of a real
OpenSearch-compatible server in two versions (osmem-server 0.1.1 answering as OpenSearch 2.19,
0.1.6 as 3.8; tests/support/opensearch.py).

A migration declared in the config runs by itself (`auto: true`, short gates) from the template
stage through bulk writes (ledger empty, `verify` equal) and compared reads to a flip in weight
steps and reverse shadowing, to done. The test only sends traffic (to both instances in turn)
and watches: at every transition the other instance must report the same position, through its
API and its `shadowlane_migration_stage` metric.

The second run sends a query on which the two versions really answer differently (a `match`
query: 2.19 scores BM25, 3.8 answers 1.0), so the reads stage must stop at `max_diff_rate`;
`shadowlane migrate status`, the API and the dashboard page (a real headless Chromium) must name
the route, the field and the figures.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from support.fleet import ENV, TOKEN_ENV, migration
from support.metrics import scrape
from support.opensearch import NEW, OLD, OpenSearchServer
from support.proxy import ProxyProcess
from support.wait import wait_until
from test_store import PgCluster, pg_cluster, pg_url  # noqa: F401  (fixtures)

INDEX = "mig-idx"
TEMPLATE = "mig-template"
DOCS = 30
#: every gate's minimum time: wide enough that the test sees each position on both instances
HOLD = "3s"


@pytest.fixture(scope="module")
def clusters() -> Iterator[tuple[OpenSearchServer, OpenSearchServer]]:
    with OpenSearchServer(OLD) as old, OpenSearchServer(NEW) as new:
        yield old, new


def es_config(old: str, new: str, store: str, *, reads_gates: dict[str, Any]) -> dict[str, Any]:
    writes = {
        "backend": "es-new",
        "percent": 0,
        "host_suffix": "",
        "order": {"scope": "es-writes", "keys": "elasticsearch"},
        "ids_from_primary": "elasticsearch",
    }
    routes: list[dict[str, Any]] = [
        {
            "name": name,
            "match": {"path_regex": regex, "methods": ["PUT", "POST", "DELETE"]},
            "backend": "es-old",
            "shadows": [dict(writes)],
        }
        for name, regex in (
            ("es-templates", r"^/_index_template/"),
            ("es-index", r"^/[^_/][^/]*/?$"),
            ("es-bulk", r"(^|/)_bulk$"),
        )
    ]
    routes.append(
        {
            "name": "es-search",
            "match": {"path_regex": r"/_search$", "methods": ["GET", "POST"]},
            "backends": [{"backend": "es-old", "weight": 100}, {"backend": "es-new", "weight": 0}],
            "shadows": [
                {"backend": "es-new", "percent": 0, "host_suffix": "", "compare": True},
                {"backend": "es-old", "percent": 0, "host_suffix": ""},
            ],
        }
    )
    routes.append({"name": "es-read", "match": {"path_prefix": "/"}, "backend": "es-old"})
    return {
        "admin": {"token_env": TOKEN_ENV},
        "backends": {"es-old": {"endpoints": [old]}, "es-new": {"endpoints": [new]}},
        "routes": routes,
        "compare": {"store": store, "ignore": ["body.took"], "flush_interval": "100ms"},
        "migrations": [
            {
                "name": "os2-to-os3",
                "old": "es-old",
                "new": "es-new",
                "auto": True,
                "interval": "300ms",
                "verify": {"kind": "opensearch", "indices": [INDEX], "interval": "1s"},
                "reverse_shadow": {"window": HOLD},
                "stages": [
                    {
                        "name": "templates",
                        "shadow": {"routes": ["es-templates", "es-index"], "percent": 100},
                        "gates": {"min_time": HOLD, "ledger_empty": True},
                    },
                    {
                        "name": "writes",
                        "shadow": {"routes": ["es-bulk"], "percent": 100},
                        "gates": {"min_time": HOLD, "ledger_empty": True, "verify_equal": True},
                    },
                    {
                        "name": "reads",
                        "shadow": {"routes": ["es-search"], "percent": 100},
                        "gates": {"min_time": HOLD, **reads_gates},
                    },
                    {
                        "name": "flip",
                        "weights": [10, 50, 100],
                        "gates": {
                            "step_time": HOLD,
                            "max_error_rate": "1%",
                            "max_p99_ratio": 50,
                            "min_requests": 5,
                        },
                    },
                ],
            }
        ],
    }


READS_GATES = {
    "min_compared": 20,
    "max_diff_rate": "1%",
    "never_differ": ["body.hits.total.value"],
}

SEARCHES = [
    {"query": {"match_all": {}}, "sort": [{"n": "asc"}], "size": 5},
    {"query": {"range": {"n": {"gte": 10}}}, "sort": [{"n": "asc"}], "size": 3},
]
#: 2.19 and 3.8 score `match` differently: body.hits.max_score and each hit's _score differ
SCORED = {"query": {"match": {"tag": "t1"}}}


class Traffic:
    """What a client of the cluster sends in each position of the migration, through both
    proxies in turn, one keep-alive connection each."""

    def __init__(self, proxies: list[ProxyProcess]) -> None:
        import http.client

        self.conns = [http.client.HTTPConnection(p.host, p.port, timeout=30) for p in proxies]
        self.n = 0
        self.statuses: dict[int, int] = {}

    def send(self, method: str, path: str, body: Any = None, *, ndjson: bool = False) -> Any:
        conn = self.conns[self.n % len(self.conns)]
        self.n += 1
        data: bytes | None
        if ndjson:
            data = "".join(json.dumps(x) + "\n" for x in body).encode()
        else:
            data = json.dumps(body).encode() if body is not None else None
        ctype = "application/x-ndjson" if ndjson else "application/json"
        conn.request(method, path, body=data, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        out = resp.read()
        self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
        assert resp.status < 500, (method, path, resp.status, out[:300])
        return json.loads(out) if out else None

    def templates(self) -> None:
        self.send(
            "PUT",
            f"/_index_template/{TEMPLATE}",
            {
                "index_patterns": ["mig-*"],
                "template": {
                    "mappings": {
                        "properties": {"n": {"type": "integer"}, "tag": {"type": "keyword"}}
                    }
                },
            },
        )

    def create_index(self) -> None:
        self.send("PUT", f"/{INDEX}")

    def bulk(self, round_: int) -> None:
        lines: list[Any] = []
        for i in range(DOCS):
            lines += [
                {"index": {"_index": INDEX, "_id": str(i)}},
                {"n": i, "tag": f"t{i % 2}", "r": round_},
            ]
        self.send("POST", "/_bulk?refresh=true", lines, ndjson=True)

    def searches(self, extra: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
        for q in [*SEARCHES, *extra]:
            self.send("POST", f"/{INDEX}/_search", q)

    def close(self) -> None:
        for c in self.conns:
            c.close()


#: the shadows each write stage turns on, to be in force on both instances before its writes
STAGE_SHADOWS = {"templates": ["es-templates", "es-index"], "writes": ["es-bulk"]}


def shadow_percent(proxy: ProxyProcess, route: str, target: str) -> float:
    from support.fleet import admin_json

    rc = next(r for r in admin_json(proxy, "/api/config")["routes"] if r["name"] == route)
    sc = next(s for s in rc["shadows"] if s["backend"] == target)
    return 0.0 if sc["paused"] else float(sc["percent"])


def wait_in_force(proxies: list[ProxyProcess], pos: str) -> None:
    """The stage's shadows copy on every instance (applied from the shared state)."""
    for route in STAGE_SHADOWS.get(pos, []):
        for proxy in proxies:
            wait_until(
                functools.partial(
                    lambda p, r: shadow_percent(p, r, "es-new") == 100.0, proxy, route
                ),
                2.0,
                f"{route} shadowed at 100% on {proxy.admin_url}",
            )


def stage_metric(proxy: ProxyProcess) -> float:
    return scrape(proxy).sum("shadowlane_migration_stage", migration="os2-to-os3")


def start_pair(cfg: dict[str, Any]) -> tuple[ProxyProcess, ProxyProcess]:
    a = ProxyProcess(cfg, env=ENV).start()
    try:
        b = ProxyProcess(cfg, env=ENV).start()
    except BaseException:
        a.close()
        raise
    return a, b


def test_migration_runs_by_itself_to_done_on_two_instances(
    clusters: tuple[OpenSearchServer, OpenSearchServer],
    pg_url: str,  # noqa: F811
) -> None:
    old, new = clusters
    cfg = es_config(old.url, new.url, pg_url, reads_gates=READS_GATES)
    a, b = start_pair(cfg)
    traffic = Traffic([a, b])
    seen: list[str] = []
    try:
        last = ""
        bulk_round = 0
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            status = migration(a, "os2-to-os3")
            pos = status["position"]
            if pos != last:
                # a transition seen on a: b reports the same position (API and metric) too
                wait_until(
                    functools.partial(lambda p: migration(b, "os2-to-os3")["position"] == p, pos),
                    2.0,
                    f"instance b at {pos}",
                )
                expected = 4.0 if pos in ("reverse", "done") else float(status["stage_index"])
                wait_until(
                    functools.partial(lambda e: stage_metric(a) == stage_metric(b) == e, expected),
                    2.0,
                    f"shadowlane_migration_stage {expected} on both at {pos}",
                )
                wait_in_force([a, b], pos)
                seen.append(pos)
                last = pos
            if pos == "done":
                break
            assert status["phase"] == "running" or pos in ("reverse",), status
            if pos == "templates":
                traffic.templates()
                traffic.create_index()
            elif pos == "writes":
                if bulk_round < 8:  # then quiet, so verify reads settled clusters
                    bulk_round += 1
                    traffic.bulk(bulk_round)
            else:
                traffic.searches()
            time.sleep(0.05)
        assert seen == [
            "templates",
            "writes",
            "reads",
            "flip@10%",
            "flip@50%",
            "flip@100%",
            "reverse",
            "done",
        ], seen
        # the writes reached the new cluster: it holds what the old one holds
        assert new.documents(INDEX) == old.documents(INDEX) and len(old.documents(INDEX)) == DOCS
        # the flip moved real traffic, and reverse shadowing fed the old cluster
        both = [scrape(a), scrape(b)]
        assert (
            sum(
                s.sum("shadowlane_requests_total", route="es-search", backend="es-new")
                for s in both
            )
            > 0
        )
        assert (
            sum(
                s.sum(
                    "shadowlane_shadow_requests_total",
                    route="es-search",
                    target="es-old",
                    outcome="ok",
                )
                for s in both
            )
            > 0
        )
        final = migration(b, "os2-to-os3")
        assert final["phase"] == "done" and final["weight"] == 100
        cfg_b = json.loads(
            subprocess.run(
                ["curl", "-s", b.admin_url + "/api/config"], capture_output=True, timeout=10
            ).stdout
        )
        search = next(r for r in cfg_b["routes"] if r["name"] == "es-search")
        assert search["weights"] == {"es-old": 0, "es-new": 100}
        # every transition is in the audit log, automatic, with the gates that allowed it
        audit = final["audit"]
        moves = [
            (x["from"], x["to"], x["actor"]) for x in reversed(audit) if x["action"] != "start"
        ]
        assert [m[1] for m in moves] == seen[1:] and {m[2] for m in moves} == {"auto"}
        reads_exit = next(x for x in audit if x["from"] == "reads")
        gates = {
            g["gate"]: g
            for g in reads_exit["gates"]
            if not g.get("route") or g["route"] == "es-search"
        }
        assert gates["max_diff_rate"]["ok"] and gates["min_compared"]["value"] >= 20
        writes_exit = next(x for x in audit if x["from"] == "writes")
        assert any(g["gate"] == "verify_equal" and g["ok"] for g in writes_exit["gates"])
        # one instance drove it all
        drivers = [p for p in (a, b) if p.stderr_lines("drives it now")]
        assert len(drivers) == 1, [p.stderr_text()[-2000:] for p in (a, b)]
    finally:
        traffic.close()
        a.close()
        b.close()


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shadowlane", "migrate", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_query_answered_differently_stops_the_reads_stage(
    clusters: tuple[OpenSearchServer, OpenSearchServer],
    pg_url: str,  # noqa: F811
    tmp_path: Any,
) -> None:
    old, new = clusters
    # a fresh index per test: the module's clusters are shared
    cfg = es_config(old.url, new.url, pg_url, reads_gates=READS_GATES)
    a, b = start_pair(cfg)
    traffic = Traffic([a, b])
    try:
        deadline = time.monotonic() + 90
        reached, wrote, last = False, 0, ""
        while time.monotonic() < deadline:
            pos = migration(a, "os2-to-os3")["position"]
            if pos != last:
                wait_in_force([a, b], pos)
                last = pos
            if pos == "templates":
                traffic.templates()
                traffic.create_index()
            elif pos == "writes":
                if wrote < 8:
                    wrote += 1
                    traffic.bulk(wrote)
            elif pos == "reads":
                reached = True
                traffic.searches([SCORED])
                blocking = migration(b, "os2-to-os3")["blocking"]
                if any(g["gate"] == "max_diff_rate" and g["verdict"] == "fail" for g in blocking):
                    break
            else:
                pytest.fail(f"went past the reads stage: {pos}")
            time.sleep(0.05)
        assert reached, migration(a, "os2-to-os3")
        # it stays there: a few more evaluations later, still reads, still running
        time.sleep(1.5)
        for proxy in (a, b):
            st = migration(proxy, "os2-to-os3")
            assert st["position"] == "reads", st
            failing = [g for g in st["blocking"] if g["verdict"] == "fail"]
            diff = next(g for g in failing if g["gate"] == "max_diff_rate")
            assert diff["route"] == "es-search"
            assert diff["field"] in ("body.hits.max_score", "body.hits.hits[0]._score"), diff
            assert diff["value"] > 1.0 and diff["threshold"] == 1.0
        # the CLI, on the store alone, names the same
        done = _run_cli("status", "os2-to-os3", "--store", pg_url, "--format", "json")
        assert done.returncode == 0, done.stderr
        st = json.loads(done.stdout)
        assert st["position"] == "reads"
        assert any(
            g["gate"] == "max_diff_rate" and g["route"] == "es-search" and "max_score" in g["field"]
            for g in st["blocking"]
        )
        text = _run_cli("status", "--store", pg_url)
        assert text.returncode == 0
        assert "fail" in text.stdout and "max_diff_rate" in text.stdout
        assert "es-search" in text.stdout and "max_score" in text.stdout
        # and the dashboard page in a real browser
        from test_migrate_dashboard import assert_dashboard_names_failing_gate

        assert_dashboard_names_failing_gate(b, tmp_path, "es-search", "max_score")
    finally:
        traffic.close()
        a.close()
        b.close()
