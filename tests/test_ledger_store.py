"""The divergence ledger in the store, on real databases (SQLite file and memory, and the private
PostgreSQL of test_store.py), and on its way there through the comparator's thread.

What is pinned: entries are written with the batch that carries them and read back as written
(keys in order, newest first, every filter); an entry is open while any of its keys is; resolving
is per (entry, key) and counts the entries it closed, once even when resolvers race; retention
never sweeps an open entry; `clear()` keeps the ledger; a store made by the previous schema
version opens, keeps its data and gains the ledger.

The databases are test_store.py's fixtures, imported by name (pytest injects them into the
tests' parameters, which ruff's F811 would call redefinitions).
"""
# ruff: noqa: F811

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shadowlane.compare import Analysis, Comparator
from shadowlane.metrics import Metrics
from shadowlane.store import (
    SCHEMA_VERSION,
    Batch,
    Divergence,
    LedgerCountRow,
    LedgerRow,
    Store,
    open_store,
)
from test_store import (  # the databases and jobs of the comparison store's tests
    batch_of,
    make_store,
    pg_cluster,  # noqa: F401
    pg_url,  # noqa: F401
    store_url,  # noqa: F401
    traffic,
)

T0 = 1_800_000_000.0


def div(
    n: int,
    keys: tuple[str, ...],
    *,
    route: str = "es-bulk",
    target: str = "es8",
    scope: str = "es-writes",
    reason: str = "dropped",
    detail: str = "",
    ts: float | None = None,
) -> Divergence:
    return Divergence(
        ts=T0 + n if ts is None else ts,
        route=route,
        target=target,
        scope=scope,
        reason=reason,
        keys=keys,
        request_id=f"req-{n}",
        method="POST",
        uri=f"/_bulk?n={n}",
        detail=detail,
    )


def write(store: Store, *entries: Divergence, jobs: int = 0) -> None:
    batch = batch_of(traffic(jobs)) if jobs else Batch()
    batch.divergences.extend(entries)
    store.write(batch)


def ids(rows: list[LedgerRow]) -> list[str]:
    return [r.request_id for r in rows]


# ---------------------------------------------------------------------------------------------
# Writing and reading


def test_entries_are_written_with_the_batch_and_read_back_as_recorded(store_url: str) -> None:
    with make_store(store_url) as store:
        assert store.ledger() == [] and store.ledger_counts() == [] and store.suspect_keys() == []
        # one batch carries comparison sums and ledger entries: both are written
        write(
            store,
            div(1, ("orders/2", "orders/1", "orders/2"), detail="primary 200, target 429"),
            div(2, ("logs",), reason="timeout"),
            jobs=4,
        )
        write(store, div(3, (), route="es-index", reason="status_mismatch"))
        assert Analysis(store).summary()[0]["compared"] == 4

        rows = store.ledger()
        assert ids(rows) == ["req-3", "req-2", "req-1"]  # newest first
        first = rows[2]
        assert first == LedgerRow(
            id=first.id,
            ts=T0 + 1,
            route="es-bulk",
            target="es8",
            scope="es-writes",
            reason="dropped",
            keys=("orders/2", "orders/1"),  # in the order recorded, each once
            request_id="req-1",
            method="POST",
            uri="/_bulk?n=1",
            detail="primary 200, target 429",
            resolved_at=None,
        )
        assert isinstance(first.id, int) and rows[0].id > rows[1].id > first.id
        # recorded without keys: nothing says which documents, so the whole scope is suspect
        assert rows[0].keys == ("*",)
        assert store.suspect_keys() == ["*", "logs", "orders/1", "orders/2"]
        assert store.ledger_counts() == [
            LedgerCountRow("es-bulk", "es8", "dropped", 1),
            LedgerCountRow("es-bulk", "es8", "timeout", 1),
            LedgerCountRow("es-index", "es8", "status_mismatch", 1),
        ]


def test_filters_and_limit(store_url: str) -> None:
    with make_store(store_url) as store:
        write(
            store,
            div(1, ("a/1",)),
            div(2, ("a/2",), target="es9"),
            div(3, ("b/1",), scope="other", reason="error"),
            div(4, ("c/1",), route="es-index", reason="error"),
        )
        assert ids(store.ledger(route="es-bulk")) == ["req-3", "req-2", "req-1"]
        assert ids(store.ledger(target="es9")) == ["req-2"]
        assert ids(store.ledger(scope="other")) == ["req-3"]
        assert ids(store.ledger(reason="error")) == ["req-4", "req-3"]
        assert ids(store.ledger(route="es-bulk", reason="error")) == ["req-3"]
        assert ids(store.ledger(route="nope")) == []
        assert ids(store.ledger(limit=2)) == ["req-4", "req-3"]
        assert store.ledger(limit=0) == []
        assert store.suspect_keys(target="es9") == ["a/2"]
        assert store.suspect_keys("es-bulk", "es8") == ["a/1", "b/1"]
        assert store.suspect_keys(scope="es-writes") == ["a/1", "a/2", "c/1"]
        assert store.suspect_keys(limit=2) == ["a/1", "a/2"]
        assert store.ledger_counts(route="es-index") == [
            LedgerCountRow("es-index", "es8", "error", 1)
        ]
        assert store.ledger_counts(target="es8", scope="es-writes") == [
            LedgerCountRow("es-bulk", "es8", "dropped", 1),
            LedgerCountRow("es-index", "es8", "error", 1),
        ]


def test_any_text_is_stored_and_read_back_the_same_on_every_driver(store_url: str) -> None:
    """Keys are anybody's document ids: quotes, unicode, long ones; PostgreSQL refuses NUL in
    text, so NUL becomes U+FFFD on every driver instead of failing the batch."""
    odd = ('idx/it\'s "quoted"', "idx/日本語", "idx/" + "x" * 2000, "idx/a\x00b")
    with make_store(store_url) as store:
        write(store, div(1, odd, detail="nul \x00 here"), jobs=2)
        [row] = store.ledger()
        assert row.keys == (*odd[:3], "idx/a\ufffdb")
        assert row.detail == "nul \ufffd here"
        assert store.suspect_keys() == sorted(row.keys)
        assert Analysis(store).summary()[0]["compared"] == 2  # the batch went in whole


# ---------------------------------------------------------------------------------------------
# Resolving


def test_resolve_partially_then_fully(store_url: str) -> None:
    with make_store(store_url) as store:
        write(
            store,
            div(1, ("orders/1", "orders/2")),
            div(2, ("orders/2",), reason="timeout"),
            div(3, ("orders/1",), target="es9"),
        )
        # orders/2: entry 2 had only that key (closed), entry 1 still has orders/1 open
        assert store.resolve_keys(["orders/2"], ts=T0 + 100) == 1
        assert ids(store.ledger()) == ["req-3", "req-1"]
        assert store.suspect_keys() == ["orders/1"]
        assert store.ledger_counts() == [
            LedgerCountRow("es-bulk", "es8", "dropped", 1),
            LedgerCountRow("es-bulk", "es9", "dropped", 1),
        ]
        # narrowed to one target: entry 3 on es9 keeps its key
        assert store.resolve_keys(iter(["orders/1", "never/seen"]), target="es8", ts=T0 + 200) == 1
        assert ids(store.ledger()) == ["req-3"]
        assert store.suspect_keys() == ["orders/1"] and store.suspect_keys(target="es8") == []
        # resolving what is resolved changes nothing
        assert store.resolve_keys(["orders/1", "orders/2"], target="es8") == 0
        assert store.resolve_keys([]) == 0

        every = {r.request_id: r for r in store.ledger(include_resolved=True)}
        assert set(every) == {"req-1", "req-2", "req-3"}
        assert every["req-2"].resolved_at == T0 + 100
        assert every["req-1"].resolved_at == T0 + 200  # when its last key was resolved
        assert every["req-1"].keys == ("orders/1", "orders/2")  # keys are kept after resolving
        assert every["req-3"].resolved_at is None
        assert store.ledger_counts(include_resolved=True) == [
            LedgerCountRow("es-bulk", "es8", "dropped", 1),
            LedgerCountRow("es-bulk", "es8", "timeout", 1),
            LedgerCountRow("es-bulk", "es9", "dropped", 1),
        ]
        # by scope and route: only what matches
        assert store.resolve_keys(["orders/1"], route="es-bulk", scope="other") == 0
        assert store.resolve_keys(["orders/1"], route="es-bulk", scope="es-writes") == 1
        assert store.ledger() == [] and store.suspect_keys() == []
        # a key that turns suspect again is a new entry, open on its own
        write(store, div(4, ("orders/1",)))
        assert store.suspect_keys() == ["orders/1"] and ids(store.ledger()) == ["req-4"]


def test_resolving_many_keys_at_once(store_url: str) -> None:
    """verify passes every key it repaired: more than one statement's worth."""
    keys = tuple(f"big/{i}" for i in range(1200))
    with make_store(store_url) as store:
        write(store, div(1, keys), div(2, keys[:10]), div(3, ("other/1",)))
        assert len(store.suspect_keys()) == 1201
        assert store.resolve_keys(keys[5:]) == 0  # both entries keep 5 keys open
        assert store.suspect_keys() == [*sorted(keys[:5]), "other/1"]
        assert store.resolve_keys(keys) == 2
        assert ids(store.ledger()) == ["req-3"]


@pytest.mark.parametrize("kind", ["sqlite-file", "postgresql"])
def test_racing_resolvers_close_each_entry_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two instances resolve overlapping keys of the same entries at the same time: every key
    ends resolved, and each entry is reported closed by exactly one of them."""
    url = (
        f"sqlite:///{tmp_path}/race.db"
        if kind == "sqlite-file"
        else request.getfixturevalue("pg_url")
    )
    entries = 40
    with open_store(url) as seed:
        write(seed, *(div(i, (f"d/{i}", f"d/{i + 1}", "shared")) for i in range(entries)))
    a, b = open_store(url), open_store(url)
    closed: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(store: Store, keys: list[str]) -> None:
        try:
            barrier.wait()
            for start in range(0, len(keys), 7):
                closed.append(store.resolve_keys(keys[start : start + 7]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    evens = [f"d/{i}" for i in range(0, entries + 1, 2)] + ["shared"]
    odds = ["shared"] + [f"d/{i}" for i in range(1, entries + 1, 2)]
    threads = [threading.Thread(target=run, args=a_keys) for a_keys in ((a, evens), (b, odds))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert sum(closed) == entries
        assert a.suspect_keys() == [] and b.ledger() == []
        assert len(a.ledger(include_resolved=True, limit=1000)) == entries
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------------------------
# Retention and resets


def test_retention_sweeps_resolved_entries_only(store_url: str) -> None:
    now = T0 + 100_000
    with make_store(store_url, retention=3600.0) as store:
        write(
            store,
            div(1, ("old/open",), ts=now - 90_000),
            div(2, ("old/resolved-long-ago",), ts=now - 90_000),
            div(3, ("old/resolved-recently",), ts=now - 90_000),
            div(4, ("new/resolved",), ts=now - 60),
        )
        assert store.resolve_keys(["old/resolved-long-ago"], ts=now - 7200) == 1
        assert store.resolve_keys(["old/resolved-recently", "new/resolved"], ts=now - 60) == 2
        # one entry resolved before the retention: it goes; an open one never does, however old
        assert store.sweep(now) == 1
        kept = ids(store.ledger(include_resolved=True))
        assert kept == ["req-4", "req-3", "req-1"]
        assert ids(store.ledger()) == ["req-1"] and store.suspect_keys() == ["old/open"]
        assert store.sweep(now + 10 * 86400) == 2  # later, the other resolved ones
        assert ids(store.ledger(include_resolved=True)) == ["req-1"]
        assert store.suspect_keys() == ["old/open"]


def test_clear_keeps_the_ledger_and_clear_ledger_forgets_it(store_url: str) -> None:
    with make_store(store_url) as store:
        write(store, div(1, ("a/1",)), div(2, ("a/2",)), jobs=3)
        store.resolve_keys(["a/2"])
        store.clear()  # a comparison reset: the shadow's data is no more right than before
        assert Analysis(store).summary() == []
        assert ids(store.ledger()) == ["req-1"] and store.suspect_keys() == ["a/1"]
        store.clear_ledger()
        assert store.ledger(include_resolved=True) == [] and store.suspect_keys() == []
        write(store, div(3, ("a/3",)))  # and it goes on working
        assert store.suspect_keys() == ["a/3"]


# ---------------------------------------------------------------------------------------------
# Schema versions

#: the tables of schema 1 exactly as that version created them (store/base.py at 1548040)
V1_SCHEMA = [
    "CREATE TABLE shadowlane_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE shadowlane_totals (
        route TEXT NOT NULL, target TEXT NOT NULL,
        compared BIGINT NOT NULL, matched BIGINT NOT NULL,
        differing BIGINT NOT NULL, noise BIGINT NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (route, target))""",
    """CREATE TABLE shadowlane_fields (
        route TEXT NOT NULL, target TEXT NOT NULL, field TEXT NOT NULL,
        raw BIGINT NOT NULL, noise BIGINT NOT NULL,
        PRIMARY KEY (route, target, field))""",
    """CREATE TABLE shadowlane_latency (
        route TEXT NOT NULL, target TEXT NOT NULL, side TEXT NOT NULL,
        bucket INTEGER NOT NULL, n BIGINT NOT NULL,
        PRIMARY KEY (route, target, side, bucket))""",
    """CREATE TABLE shadowlane_examples (
        id {id},
        route TEXT NOT NULL, target TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
        request_id TEXT NOT NULL, method TEXT NOT NULL, uri TEXT NOT NULL,
        data TEXT NOT NULL)""",
    """CREATE TABLE shadowlane_example_fields (
        route TEXT NOT NULL, target TEXT NOT NULL, field TEXT NOT NULL,
        example_id BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (route, target, field, example_id))""",
    "INSERT INTO shadowlane_meta (key, value) VALUES ('schema', '{version}')",
    "INSERT INTO shadowlane_totals VALUES ('orders', 'v2', 7, 5, 2, 0, 1700000000.0)",
    "INSERT INTO shadowlane_fields VALUES ('orders', 'v2', 'body.total', 2, 0)",
]


class RawDb:
    """The database behind a store URL, through its driver and nothing of ours."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = url.startswith("sqlite:///")

    def run(self, statements: list[str], version: str = "1") -> None:
        if self.sqlite:
            with sqlite3.connect(self.url[len("sqlite:///") :]) as conn:
                for s in statements:
                    conn.execute(s.format(id="INTEGER PRIMARY KEY AUTOINCREMENT", version=version))
            conn.close()
            return
        import psycopg

        ident = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
        with psycopg.connect(self.url, autocommit=True) as conn:
            for s in statements:
                conn.execute(s.format(id=ident, version=version))  # type: ignore[call-overload]

    def query(self, sql: str) -> list[Any]:
        if self.sqlite:
            with sqlite3.connect(self.url[len("sqlite:///") :]) as conn:
                rows = conn.execute(sql).fetchall()
            conn.close()
            return rows
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql).fetchall()  # type: ignore[call-overload, no-any-return]


@pytest.fixture(params=["sqlite-file", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> RawDb:
    if request.param == "sqlite-file":
        return RawDb(f"sqlite:///{tmp_path}/v1.db")
    return RawDb(request.getfixturevalue("pg_url"))


def test_a_store_of_the_previous_schema_opens_and_gains_the_ledger(empty_db: RawDb) -> None:
    empty_db.run(V1_SCHEMA)
    assert SCHEMA_VERSION == 3
    with open_store(empty_db.url) as store:
        # what version 1 wrote is all there, and written to as before
        assert Analysis(store).summary()[0]["compared"] == 7
        store.write(batch_of(traffic(2)))
        assert Analysis(store).summary()[0]["compared"] == 9
        fields = {f.field: f.raw for f in store.field_counts("orders", "v2")}
        assert fields == {"body.total": 2, "body.price": 1, "body.uuid": 2}
        # and the ledger works in it
        write(store, div(1, ("a/1",)))
        assert store.suspect_keys() == ["a/1"]
    assert empty_db.query("SELECT value FROM shadowlane_meta WHERE key = 'schema'") == [("3",)]
    with open_store(empty_db.url) as again:  # opening an upgraded store changes nothing
        assert again.suspect_keys() == ["a/1"]
        assert Analysis(again).summary()[0]["compared"] == 9
    assert empty_db.query("SELECT value FROM shadowlane_meta WHERE key = 'schema'") == [("3",)]


def test_a_store_of_a_newer_schema_is_used_and_its_version_left_alone(empty_db: RawDb) -> None:
    """A fleet upgraded half-way: an older instance still writes the store a newer one made."""
    empty_db.run(V1_SCHEMA, version="99")
    with open_store(empty_db.url) as store:
        write(store, div(1, ("a/1",)), jobs=1)
        assert store.suspect_keys() == ["a/1"]
        assert Analysis(store).summary()[0]["compared"] == 8
    assert empty_db.query("SELECT value FROM shadowlane_meta WHERE key = 'schema'") == [("99",)]


def test_a_new_store_records_the_current_schema(empty_db: RawDb) -> None:
    with open_store(empty_db.url) as store:
        assert store.ledger() == []
    assert empty_db.query("SELECT value FROM shadowlane_meta WHERE key = 'schema'") == [
        (str(SCHEMA_VERSION),)
    ]


# ---------------------------------------------------------------------------------------------
# Through the comparator's thread


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def test_recorded_entries_reach_the_store_off_the_loop(store_url: str) -> None:
    metrics = Metrics()
    with make_store(store_url) as store:
        comp = Comparator(store, metrics, 100, flush_interval=10.0).start()
        try:
            started = time.perf_counter()
            for i in range(20):
                assert comp.record_divergence(div(i, (f"k/{i}",)))
            assert time.perf_counter() - started < 0.1  # appends, nothing waits for the store
            for j in traffic(3):
                comp.submit(j)
            # long before the flush interval: wait_idle asks for a flush and covers the ledger
            assert comp.wait_idle(10)
            assert len(store.ledger(limit=1000)) == 20
            assert Analysis(store).summary()[0]["compared"] == 3
            assert comp.stats["ledger_recorded"] == 20 and comp.stats["ledger_dropped"] == 0
            assert comp.record_divergence(div(99, ("last/1",)))
        finally:
            assert comp.stop(10)
        # stop() flushes what was recorded last
        assert "last/1" in store.suspect_keys()
        assert not comp.record_divergence(div(100, ("after/stop",)))  # stopped: dropped
        assert comp.stats["ledger_dropped"] == 1
    assert metric(metrics, "shadowlane_ledger_dropped_total", route="es-bulk", target="es8") == 1


def test_a_full_ledger_queue_drops_and_counts(tmp_path: Path) -> None:
    metrics = Metrics()
    with open_store(f"sqlite:///{tmp_path}/full.db") as store:
        # not started: nothing takes the queue, so it fills at queue_size
        comp = Comparator(store, metrics, 5, flush_interval=10.0)
        results = [comp.record_divergence(div(i, (f"k/{i}",), target="t1")) for i in range(8)]
        results.append(comp.record_divergence(div(8, ("k/8",), target="t2")))
        assert results == [True] * 5 + [False] * 4
        assert comp.ledger_queued == 5
        assert comp.stats["ledger_dropped"] == 4
        comp.start()
        try:
            assert comp.wait_idle(10)
        finally:
            assert comp.stop(10)
        assert store.suspect_keys() == [f"k/{i}" for i in range(5)]
    assert metric(metrics, "shadowlane_ledger_dropped_total", route="es-bulk", target="t1") == 3
    assert metric(metrics, "shadowlane_ledger_dropped_total", route="es-bulk", target="t2") == 1


def test_entries_of_a_failed_write_wait_then_are_counted_as_dropped(tmp_path: Path) -> None:
    """A failed write keeps its batch to retry (bounded, tests/test_store_outage.py shows the
    catch-up); a store still down at shutdown loses it, and its entries count as dropped."""
    metrics = Metrics()
    store = open_store(f"sqlite:///{tmp_path}/gone.db")
    comp = Comparator(store, metrics, 10, flush_interval=10.0).start()
    try:
        store.close()  # every write fails from now on
        assert comp.record_divergence(div(1, ("a/1",)))
        assert comp.record_divergence(div(2, ("a/2",)))
        assert comp.wait_idle(10)  # waiting to retry: wait_idle does not hang on a dead store
        assert comp.stats["write_errors"] >= 1
        assert comp.pending_batches == 1
        assert comp.stats["ledger_dropped"] == 0
    finally:
        comp.stop(10)
    assert comp.stats["ledger_dropped"] == 2
    assert metric(metrics, "shadowlane_ledger_dropped_total", route="es-bulk", target="es8") == 2
