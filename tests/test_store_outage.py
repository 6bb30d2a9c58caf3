"""A PostgreSQL store stopped and started under a running comparator: comparisons decided
during the outage wait (bounded) and are written once it is back; none is lost.

The cluster is this module's own (stopping the session's shared one would break the tests
that run beside it); it is the same private, socket-only PostgreSQL as tests/test_store.py's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shadowlane.compare import Analysis, Comparator
from shadowlane.metrics import Metrics
from support.wait import wait_until
from test_store import PgCluster, _pg_bin, make_store, traffic


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    bindir = _pg_bin()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries missing in CI")
        pytest.skip("PostgreSQL binaries not installed")
    c = PgCluster(bindir).start()
    try:
        yield c
    finally:
        c.stop()


def _pg_ctl(c: PgCluster, action: str) -> None:
    opts = f"-p {c.port} -k {c.root} -c listen_addresses='' -c fsync=off"
    args = ["pg_ctl", "-D", str(c.data), "-w", action]
    if action == "start":
        args = [*args[:3], "-l", str(c.root / "log"), "-o", opts, *args[3:]]
    else:
        args += ["-m", "immediate"]
    done = c._run(*args)
    assert done.returncode == 0, done.stdout + done.stderr


def test_comparisons_wait_for_the_store_and_catch_up(cluster: PgCluster) -> None:
    url = cluster.create_db()
    metrics = Metrics()
    with make_store(url) as store:
        comp = Comparator(store, metrics, 1000, flush_interval=0.05, batch=5).start()
        try:
            for j in traffic(10):
                assert comp.submit(j)
            assert comp.wait_idle(20)
            assert Analysis(store).summary()[0]["compared"] == 10
            _pg_ctl(cluster, "stop")
            for j in traffic(20):
                assert comp.submit(j)
            assert comp.wait_idle(20)
            wait_until(lambda: comp.stats["write_errors"] > 0, 10, "a failed write")
            assert comp.pending_batches > 0
            assert comp.stats["store_lost"] == 0
            _pg_ctl(cluster, "start")
            wait_until(lambda: comp.pending_batches == 0, 20, "the store to catch up")
        finally:
            assert comp.stop(10)
        assert comp.stats["store_lost"] == 0
    with make_store(url) as store:
        [row] = Analysis(store).summary()
        assert row["compared"] == 30


def test_a_store_opened_while_the_server_is_down_waits_for_it(cluster: PgCluster) -> None:
    """A restarted worker opens its store with wait_for_server: the server being down then is
    no error (a first start still fails, which is how a wrong URL shows)."""
    from shadowlane.store import open_store

    url = cluster.create_db()
    _pg_ctl(cluster, "stop")
    with pytest.raises(Exception, match=r"connect|socket|server"):
        open_store(url)
    store = open_store(url, wait_for_server=True)
    try:
        comp = Comparator(store, Metrics(), 1000, flush_interval=0.05, batch=5).start()
        try:
            for j in traffic(6):
                assert comp.submit(j)
            wait_until(lambda: comp.stats["write_errors"] > 0, 10, "a failed write")
            _pg_ctl(cluster, "start")
            wait_until(lambda: comp.pending_batches == 0, 20, "the store to catch up")
        finally:
            assert comp.stop(10)
        assert Analysis(store).summary()[0]["compared"] == 6
    finally:
        store.close()
