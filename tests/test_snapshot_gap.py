"""The snapshot gap, closed by recording and replay: a migration's first write step end to end.

A new cluster is loaded from a snapshot of the old one, and shadowing goes live some time
later: the writes in between are in the snapshot's future and the shadow's past. Recorded at
the ingress, they can be replayed into the new cluster through the same ordering scope and id
rewriting as live copies (docs/shadowing.md, step 2).

Real servers only: osmem-server 0.1.1 (OpenSearch 2.19) is the primary, 0.1.6 (3.8) the new
cluster; clients talk to the proxy, which records its write routes with the primary's answers.

1. Before: writes through the proxy (recorded; no shadow yet).
2. The snapshot point T0: the new cluster is loaded with every document of the primary as of T0
   (writers paused, so the copy is as of one moment, as a snapshot is).
3. The gap: more writes, recorded, not shadowed.
4. Shadowing goes live at T1 (a reload adds the shadows), while writers pause; the window
   [T0, T1) is replayed into the new cluster as that shadow (`replay -c --shadow`): recorded
   answers give the generated ids, the scope orders the writes.
5. After: writes with live shadowing.
At the end `shadowlane verify` finds the two clusters equal, and so does the test's own
document-by-document comparison. Without the replay, the gap's writes are missing (checked, so
the test can fail).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from shadowlane.record import REQUEST, RESPONSE, iter_merged, recording_files
from support.metrics import scrape
from support.opensearch import NEW, OLD, OpenSearchServer
from support.proxy import ProxyProcess
from support.wait import wait_until
from test_es_convergence import DOCS, INDEX, TARGET, Client, config, settle_all

T = 30.0
CLIENTS = 3
ROUNDS = 3


def phase(px: ProxyProcess, locks: list[threading.Lock], seed: int) -> dict[str, int]:
    """CLIENTS clients, ROUNDS rounds of a bulk and two single writes each; what they sent."""

    def one(n: int) -> dict[str, int]:
        client = Client(px, seed * 100 + n, locks)
        try:
            for r in range(ROUNDS):
                client.bulk_round(seed * 10 + r)
                client.single_round(seed * 10 + r)
        finally:
            client.conn.close()
        return client.sent

    sent: dict[str, int] = {}
    with ThreadPoolExecutor(CLIENTS) as pool:
        for per in pool.map(one, range(CLIENTS)):
            for route, k in per.items():
                sent[route] = sent.get(route, 0) + k
    return sent


def recording_config(old: str, new: str, store: str, rec: Path, shadows: bool) -> dict[str, Any]:
    cfg = config(old, new, converging=True, store=store)
    for route in cfg["routes"]:
        if route["name"] == "es-read":
            continue
        route["record"] = {"dir": str(rec), "answers": True, "gzip": False}
        if not shadows:
            route["shadows"] = []
    return cfg


def snapshot(old: OpenSearchServer, new: OpenSearchServer) -> int:
    """Load `new` with `old`'s documents as of now (writers are paused); the ns timestamp."""
    t0 = time.time_ns()
    docs = old.documents(INDEX)
    assert "acknowledged" in new.request("PUT", f"/{INDEX}", {})
    lines: list[Any] = []
    for doc_id, source in docs.items():
        lines += [{"index": {"_index": INDEX, "_id": doc_id}}, source]
    if lines:
        answer = new.request("POST", "/_bulk?refresh=true", lines, ndjson=True)
        assert answer.get("errors") is False, answer
    return t0


def test_the_gap_between_snapshot_and_shadowing_is_replayed(tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    store = f"sqlite:///{tmp_path / 'store.db'}"
    locks = [threading.Lock() for _ in range(DOCS)]
    with OpenSearchServer(OLD) as old, OpenSearchServer(NEW) as new:
        before_cfg = recording_config(old.url, new.url, store, rec, shadows=False)
        with ProxyProcess(before_cfg) as px:
            # the index on the primary only: the snapshot brings it to the new cluster
            px_conn_put(px, f"/{INDEX}", {"settings": {"number_of_shards": 1}})
            before = phase(px, locks, seed=1)
            t0 = snapshot(old, new)
            at_snapshot = old.documents(INDEX)
            gap = phase(px, locks, seed=2)

            # shadowing goes live at T1: a reload adds the shadows (writers are paused)
            live_cfg = recording_config(old.url, new.url, store, rec, shadows=True)
            px.write_config({**px.config, "routes": live_cfg["routes"]})
            px.reload()
            wait_until(
                lambda: scrape(px).select("shadowlane_shadow_requests_total", route="es-bulk"),
                T,
                "the reload to add the shadows",
            )
            t1 = time.time_ns()
            gap_docs = old.documents(INDEX)
            assert gap_docs != at_snapshot, "the gap's writes changed nothing"
            assert new.documents(INDEX) == at_snapshot  # the gap is not in the new cluster

            # replay [T0, T1) into the new cluster as the configured shadow
            replay_cfg = tmp_path / "replay.yaml"
            replay_cfg.write_text(yaml.safe_dump(live_cfg))
            done = subprocess.run(
                [sys.executable, "-m", "shadowlane", "replay", str(rec),
                 "-c", str(replay_cfg), "--shadow", TARGET, "--store", store,
                 "--from", str(t0), "--until", str(t1), "--speed", "max",
                 "--concurrency", "8", "--format", "json", "--no-progress"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            summary = json.loads(done.stdout)
            n_gap = sum(gap.values())
            assert summary["sent"] == n_gap, (summary, gap)
            assert new.documents(INDEX) == gap_docs  # the gap is closed

            after = phase(px, locks, seed=3)
            settle_all(px, after, {})
            stderr = px.stderr_text()
        assert "Traceback" not in stderr, stderr
        # every write of the three phases was recorded (the index creation too), with its answer
        # (the proxy has stopped: its writer has flushed everything)
        kinds = [p.kind for p in iter_merged(recording_files([rec]))]
        n_writes = sum(before.values()) + sum(gap.values()) + sum(after.values()) + 1
        assert kinds.count(REQUEST) == n_writes and kinds.count(RESPONSE) == n_writes, kinds
        primary = old.documents(INDEX)
        assert any(not k.startswith("d") for k in primary), "no generated id in the workload"
        assert new.documents(INDEX) == primary
        check = subprocess.run(
            [sys.executable, "-m", "shadowlane", "verify", "--kind", "elasticsearch",
             "--primary", old.url, "--shadow", new.url, "--index", INDEX, "--format", "json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        assert json.loads(check.stdout)["equal"] is True


def px_conn_put(px: ProxyProcess, path: str, body: Any) -> None:
    conn = http.client.HTTPConnection(px.host, px.port, timeout=T)
    try:
        conn.request(
            "PUT", path, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data
    finally:
        conn.close()
