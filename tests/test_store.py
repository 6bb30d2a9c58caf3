"""The comparison store on real databases: SQLite (file and memory) and a private PostgreSQL.

The PostgreSQL cluster is started per test session in a temp dir from Debian's `postgresql`
package binaries (`initdb`/`pg_ctl`), as user `postgres` when we are root (PostgreSQL refuses to
run as root), listening only on a Unix socket in the temp dir. Each test gets its own database.
Without the binaries the PostgreSQL cases are skipped on a developer machine, but fail in CI
(`CI` set), where `.ci/run` installs the package.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from shadowlane.compare import (
    Analysis,
    Captured,
    Comparator,
    CompareJob,
    compile_settings,
    evaluate,
    percentile,
    record,
)
from shadowlane.config import ShadowCompare
from shadowlane.metrics import Metrics
from shadowlane.store import (
    Batch,
    FieldRow,
    LatencyRow,
    LedgerCountRow,
    LedgerRow,
    Store,
    StoreOptions,
    TotalsRow,
    latency_bucket,
    open_store,
)

# ---------------------------------------------------------------------------------------------
# A private PostgreSQL


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PgCluster:
    """initdb + pg_ctl in a temp dir; `url(db)` for psycopg.

    It listens on a Unix socket in its own directory and on no TCP port at all: a TCP port
    would have to be picked before the server starts, and could be taken meanwhile. The
    "port" only names the socket file (`.s.PGSQL.5432`) inside that private directory.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="shadowlane-pg-"))
        self.data = self.root / "data"
        self.port = 5432
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> PgCluster:
        done = self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses='' -c fsync=off"
        done = self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts, "-w", "start"
        )
        if done.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}{log}")
        return self

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@/{db}?host={self.root}&port={self.port}"

    def create_db(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = _pg_bin()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries missing in CI: .ci/run must install `postgresql`")
        pytest.skip("PostgreSQL binaries not installed (apt-get install postgresql)")
    cluster = PgCluster(bindir).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    return pg_cluster.create_db()


@pytest.fixture(params=["sqlite-file", "sqlite-memory", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite-file":
        return f"sqlite:///{tmp_path}/results.db"
    if request.param == "sqlite-memory":
        return "sqlite:///:memory:"
    return str(request.getfixturevalue("pg_url"))


def make_store(url: str, **kw: Any) -> Store:
    return open_store(url, StoreOptions(**kw))


# ---------------------------------------------------------------------------------------------
# Jobs


def cap(body: dict[str, Any], status: int = 200, seconds: float = 0.01) -> Captured:
    return Captured(
        status, [(b"content-type", b"application/json")], orjson.dumps(body), False, seconds
    )


SETTINGS = compile_settings(ShadowCompare())


def mkjob(
    route: str,
    primary: dict[str, Any],
    candidate: dict[str, Any],
    secondary: dict[str, Any] | None = None,
    *,
    target: str = "v2",
    ts: float = 0.0,
    rid: str = "",
    p_s: float = 0.01,
    c_s: float = 0.02,
) -> CompareJob:
    return CompareJob(
        route,
        target,
        rid or uuid.uuid4().hex,
        "POST",
        f"/{route}?q=1",
        b'{"q": 1}',
        cap(primary, seconds=p_s),
        cap(candidate, seconds=c_s),
        cap(secondary) if secondary is not None else None,
        SETTINGS,
        ts=ts or time.time(),
    )


def batch_of(jobs: list[CompareJob], examples_per_field: int = 5) -> Batch:
    batch = Batch(examples_per_field=examples_per_field)
    for j in jobs:
        batch.jobs += 1
        record(batch, j, evaluate(j))
    return batch


def traffic(n: int) -> list[CompareJob]:
    """n requests: `price` really differs on every 2nd, `uuid` is random everywhere (noise)."""
    jobs = []
    for i in range(n):
        p = {"id": i, "price": 10, "uuid": uuid.uuid4().hex}
        c = {"id": i, "price": 12 if i % 2 else 10, "uuid": uuid.uuid4().hex}
        s = {"id": i, "price": 10, "uuid": uuid.uuid4().hex}
        jobs.append(mkjob("orders", p, c, s, p_s=0.010, c_s=0.030))
    return jobs


# ---------------------------------------------------------------------------------------------
# Tests on every store


def test_aggregates_rates_and_thresholds(store_url: str) -> None:
    with make_store(store_url) as store:
        store.write(batch_of(traffic(10)))
        store.write(batch_of(traffic(10)))  # increments add up across writes
        [row] = Analysis(store).summary()
        assert (row["route"], row["target"], row["compared"]) == ("orders", "v2", 20)
        assert (row["matched"], row["differing"], row["noise"]) == (0, 10, 10)
        assert row["diff_rate"] == pytest.approx(0.5)
        assert row["noise_rate"] == pytest.approx(0.5)
        assert [f["field"] for f in row["top_fields"]] == ["body.price"]
        fields = {f["field"]: f for f in Analysis(store).fields("orders", "v2")}
        assert set(fields) == {"body.price", "body.uuid"}
        assert fields["body.price"] == {
            "field": "body.price",
            "raw": 10,
            "noise": 0,
            "raw_rate": 0.5,
            "noise_rate": 0.0,
            "reported": True,
        }
        assert fields["body.uuid"]["raw"] == 20 and fields["body.uuid"]["noise"] == 20
        assert fields["body.uuid"]["reported"] is False
        assert Analysis(store).fields("nope", "v2") == []


def test_rows_are_the_sums_as_written(store_url: str) -> None:
    """The store answers with sums only; what they mean is the analysis' (test_analysis.py)."""
    with make_store(store_url) as store:
        store.write(batch_of(traffic(10)))
        store.write(batch_of(traffic(10)))
        store.write(batch_of([mkjob("a", {"x": 1}, {"x": 2}, target="v3", p_s=0.5, c_s=0.5)]))
        assert store.totals() == [
            TotalsRow("a", "v3", 1, 0, 1, 0),
            TotalsRow("orders", "v2", 20, 0, 10, 10),
        ]
        assert store.totals("orders", "v2") == [TotalsRow("orders", "v2", 20, 0, 10, 10)]
        assert store.totals(target="v3") == [TotalsRow("a", "v3", 1, 0, 1, 0)]
        assert store.totals("nope", "v2") == []
        assert sorted(store.field_counts("orders", "v2")) == [
            FieldRow("orders", "v2", "body.price", 10, 0),
            FieldRow("orders", "v2", "body.uuid", 20, 20),
        ]
        assert sorted(store.field_counts()) == [
            FieldRow("a", "v3", "body.x", 1, 0),
            *sorted(store.field_counts(route="orders")),
        ]
        assert sorted(store.latency_counts("orders", "v2")) == [
            LatencyRow("orders", "v2", "primary", latency_bucket(0.010), 20),
            LatencyRow("orders", "v2", "shadow", latency_bucket(0.030), 20),
        ]
        assert {r.route for r in store.latency_counts()} == {"a", "orders"}


def test_latency_percentiles(store_url: str) -> None:
    jobs = [mkjob("r", {"a": 1}, {"a": 1}, p_s=0.010, c_s=0.050) for _ in range(99)]
    jobs.append(mkjob("r", {"a": 1}, {"a": 1}, p_s=0.010, c_s=2.0))
    with make_store(store_url) as store:
        store.write(batch_of(jobs))
        lat = Analysis(store).summary()[0]["latency"]
    assert lat["primary_p50"] == pytest.approx(0.010, rel=0.05)
    assert lat["primary_p99"] == pytest.approx(0.010, rel=0.05)
    assert lat["shadow_p50"] == pytest.approx(0.050, rel=0.05)
    assert lat["shadow_p99"] == pytest.approx(0.050, rel=0.05)
    assert percentile({latency_bucket(2.0): 1}, 0.99) == pytest.approx(2.0, rel=0.05)


def test_examples_newest_kept_per_field(store_url: str) -> None:
    t0 = time.time()
    with make_store(store_url, examples_per_field=2) as store:
        for i in range(5):  # one write per example: trimming happens in the store
            j = mkjob("r", {"a": 1, "b": 1}, {"a": 2, "b": 1}, ts=t0 + i, rid=f"a{i}")
            store.write(batch_of([j], 2))
        # one batch holding more than the cap: trimmed before it is written
        store.write(
            batch_of(
                [mkjob("r", {"b": 1}, {"b": 2}, ts=t0 + 10 + i, rid=f"b{i}") for i in range(4)], 2
            )
        )
        a = store.examples("r", "v2", "body.a")
        assert [e["request_id"] for e in a] == ["a4", "a3"]
        b = store.examples("r", "v2", "body.b")
        assert [e["request_id"] for e in b] == ["b3", "b2"]
        every = store.examples("r", "v2")
        assert [e["request_id"] for e in every] == ["b3", "b2", "a4", "a3"]
        assert [e["request_id"] for e in store.examples("r", "v2", limit=1)] == ["b3"]
        ex = a[0]
        assert ex["method"] == "POST" and ex["uri"] == "/r?q=1"
        assert ex["request_body"] == '{"q": 1}'
        assert ex["primary"]["status"] == 200
        assert orjson.loads(ex["primary"]["body"]) == {"a": 1, "b": 1}
        assert orjson.loads(ex["candidate"]["body"]) == {"a": 2, "b": 1}
        assert ex["candidate"]["values"] == {"body.a": [1, 2]}
        assert ex["primary"]["headers"] == {"content-type": "application/json"}
        assert ex["differing"] == ["body.a"] and ex["noise"] == []
        assert ex["ts"] == pytest.approx(t0 + 4)


def test_retention_sweep(store_url: str) -> None:
    now = time.time()
    with make_store(store_url, retention=3600.0) as store:
        old = mkjob("r", {"a": 1}, {"a": 2}, ts=now - 7200, rid="old")
        new = mkjob("r", {"a": 1}, {"a": 2}, ts=now - 60, rid="new")
        store.write(batch_of([old, new]))
        assert len(store.examples("r", "v2")) == 2
        assert store.sweep(now) == 1
        assert [e["request_id"] for e in store.examples("r", "v2")] == ["new"]
        assert [e["request_id"] for e in store.examples("r", "v2", "body.a")] == ["new"]
        # aggregates are not subject to retention
        assert Analysis(store).summary()[0]["compared"] == 2


def test_clear(store_url: str) -> None:
    with make_store(store_url) as store:
        store.write(batch_of(traffic(4)))
        store.clear()
        assert Analysis(store).summary() == []
        assert store.examples("orders", "v2") == []


def test_queries_from_another_thread_while_writing(store_url: str) -> None:
    with make_store(store_url) as store:
        errors: list[BaseException] = []
        stop = threading.Event()

        def reader() -> None:
            try:
                while not stop.is_set():
                    for row in Analysis(store).summary():
                        Analysis(store).fields(row["route"], row["target"])
                        store.examples(row["route"], row["target"], limit=3)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=reader)
        t.start()
        try:
            for _ in range(20):
                store.write(batch_of(traffic(5)))
        finally:
            stop.set()
            t.join(10)
        assert errors == []
        assert Analysis(store).summary()[0]["compared"] == 100


def test_comparator_end_to_end(store_url: str) -> None:
    metrics = Metrics()
    with make_store(store_url) as store:
        comp = Comparator(store, metrics, 1000, flush_interval=0.05, batch=7).start()
        try:
            for j in traffic(30):
                assert comp.submit(j)
            assert comp.wait_idle(20)
        finally:
            assert comp.stop(10)
        [row] = Analysis(store).summary()
        assert (row["compared"], row["differing"], row["noise"]) == (30, 15, 15)
    text = metrics.render()[0].decode()
    assert 'shadowlane_comparisons_total{result="diff",route="orders",target="v2"} 15.0' in text
    assert 'shadowlane_comparisons_total{result="noise",route="orders",target="v2"} 15.0' in text


# ---------------------------------------------------------------------------------------------
# SQLite specifics


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///relative.db") as s:
        s.write(batch_of(traffic(1)))
    assert (tmp_path / "relative.db").exists()
    absolute = tmp_path / "sub" / "abs.db"
    absolute.parent.mkdir()
    with open_store(f"sqlite:///{absolute}") as s:
        s.write(batch_of(traffic(1)))
    # reopening sees the data: the schema is created once, then reused
    with open_store(f"sqlite:///{absolute}") as s:
        assert Analysis(s).summary()[0]["compared"] == 1
    with pytest.raises(ValueError, match="unknown store URL"):
        open_store("mysql://x")


def test_two_sqlite_handles_on_one_file_add_up(tmp_path: Path) -> None:
    """`--workers N` shares one SQLite file between processes: increments must add up."""
    url = f"sqlite:///{tmp_path}/shared.db"
    a, b = open_store(url), open_store(url)
    try:
        threads = [
            threading.Thread(target=lambda s=s: [s.write(batch_of(traffic(5))) for _ in range(10)])
            for s in (a, b)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert Analysis(a).summary()[0]["compared"] == 100
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------------------------
# PostgreSQL: many instances, one store


def test_postgres_two_instances_add_up(pg_url: str) -> None:
    a, b = open_store(pg_url), open_store(pg_url)
    try:
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def run(store: Store) -> None:
            try:
                barrier.wait()
                for _ in range(15):
                    store.write(batch_of(traffic(4)))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        for store in (a, b):
            [row] = Analysis(store).summary()
            assert (row["compared"], row["differing"], row["noise"]) == (120, 60, 60)
            fields = {f["field"]: f for f in Analysis(store).fields("orders", "v2")}
            assert (fields["body.price"]["raw"], fields["body.uuid"]["noise"]) == (60, 120)
            # examples stay capped per field across both writers
            assert len(store.examples("orders", "v2", "body.price")) == 5
    finally:
        a.close()
        b.close()


def test_postgres_schema_created_concurrently(pg_url: str) -> None:
    stores: list[Store] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(open_store(pg_url))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in stores:
        s.close()
    assert errors == [] and len(stores) == 4


def test_postgres_reconnects_after_connection_loss(pg_url: str) -> None:
    import psycopg

    with open_store(pg_url) as store:
        store.write(batch_of(traffic(2)))
        Analysis(store).summary()
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'shadowlane-%'"
            )
        store.write(batch_of(traffic(2)))
        assert Analysis(store).summary()[0]["compared"] == 4


# ---------------------------------------------------------------------------------------------
# A slow store: the queue fills, jobs are dropped and counted, memory stays bounded


class SlowStore(Store):
    """Wraps a real store; every write sleeps first (a remote database under load)."""

    def __init__(self, inner: Store, delay: float) -> None:
        super().__init__(inner.options)
        self.inner = inner
        self.delay = delay
        self.writes = 0

    def write(self, batch: Batch) -> None:
        time.sleep(self.delay)
        self.writes += 1
        self.inner.write(batch)

    def sweep(self, now: float | None = None) -> int:
        return self.inner.sweep(now)

    def totals(self, route: str | None = None, target: str | None = None) -> list[TotalsRow]:
        return self.inner.totals(route, target)

    def field_counts(self, route: str | None = None, target: str | None = None) -> list[FieldRow]:
        return self.inner.field_counts(route, target)

    def latency_counts(
        self, route: str | None = None, target: str | None = None
    ) -> list[LatencyRow]:
        return self.inner.latency_counts(route, target)

    def examples(
        self, route: str, target: str, field: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        return self.inner.examples(route, target, field, limit)

    def clear(self) -> None:
        self.inner.clear()

    def ledger(
        self,
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        reason: str | None = None,
        include_resolved: bool = False,
        limit: int = 100,
    ) -> list[LedgerRow]:
        return self.inner.ledger(route, target, scope, reason, include_resolved, limit)

    def ledger_counts(
        self,
        route: str | None = None,
        target: str | None = None,
        include_resolved: bool = False,
        *,
        scope: str | None = None,
    ) -> list[LedgerCountRow]:
        return self.inner.ledger_counts(route, target, include_resolved, scope=scope)

    def suspect_keys(
        self,
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        *,
        limit: int | None = None,
    ) -> list[str]:
        return self.inner.suspect_keys(route, target, scope, limit=limit)

    def resolve_keys(
        self,
        keys: Iterable[str],
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        ts: float | None = None,
    ) -> int:
        return self.inner.resolve_keys(keys, route, target, scope, ts)

    def clear_ledger(self) -> None:
        self.inner.clear_ledger()

    def close(self) -> None:
        self.inner.close()


def test_slow_store_drops_and_memory_stays_bounded(tmp_path: Path) -> None:
    queue_size, body_size, jobs = 20, 200_000, 600
    metrics = Metrics()
    store = SlowStore(open_store(f"sqlite:///{tmp_path}/slow.db"), delay=0.3)
    comp = Comparator(store, metrics, queue_size, flush_interval=0.05, batch=5).start()
    tracemalloc.start()
    try:
        accepted = 0
        max_queued = 0
        for i in range(jobs):
            # a fresh ~200 kB JSON body per answer (built directly: the test's own garbage must
            # not be what the peak measures)
            blob = os.urandom(body_size // 2).hex().encode()
            j = mkjob("big", {}, {})
            j.primary.body = b'{"blob": "' + blob + b'", "i": %d}' % i
            j.candidate.body = b'{"blob": "' + blob + b'", "i": %d}' % -i
            accepted += comp.submit(j)
            max_queued = max(max_queued, comp.queued)
            del j, blob
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        assert comp.stop(60)
        store.close()
    dropped = jobs - accepted
    assert dropped > jobs // 2, "a store this slow must make the comparator drop"
    assert max_queued <= queue_size
    assert comp.stats["dropped"] == dropped
    # Unbounded, 600 jobs x 2 answers x 200 kB would be ~240 MB; bounded it is the queue
    # (20 jobs) plus the batch being compared and written (5 jobs): ~12 MB measured.
    assert peak < 40 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB"
    text = metrics.render()[0].decode()
    line = f'shadowlane_comparisons_total{{result="dropped",route="big",target="v2"}} {dropped}.0'
    assert line in text


def test_a_store_opens_while_another_process_writes_the_new_file(tmp_path: Path) -> None:
    """`--workers N` opens one new SQLite file in N processes at once. Switching a file to WAL
    needs the lock a writer holds, and SQLite refuses it at once ("database is locked", no busy
    handler): a worker exited at start-up in CI. Here another connection holds a write
    transaction on the new file (not yet WAL) for 0.3 s; the store must wait and open."""
    import sqlite3

    from shadowlane.store.sqlite import SqliteStore

    path = tmp_path / "busy.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE held (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO held VALUES (1)")
    released = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    released.start()
    t0 = time.monotonic()
    try:
        store = SqliteStore(str(path))
    finally:
        released.join()
        other.close()
    assert time.monotonic() - t0 >= 0.25  # it did meet the lock, and waited it out
    journal = store._writer().execute("PRAGMA journal_mode").fetchone()[0]
    store.close()
    assert journal == "wal"
