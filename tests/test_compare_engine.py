"""The comparator itself: it rests so comparisons cannot take more than their share of a core,
it stops cleanly (comparing what was accepted), and submit never blocks."""

from __future__ import annotations

import os
import threading
import time

import orjson
import pytest

from shadowlane.compare import Analysis, Captured, Comparator, CompareJob
from shadowlane.compare.engine import BATCH_JOBS
from shadowlane.metrics import Metrics
from shadowlane.store import open_store
from support.procfs import stat_fields


def heavy_job(i: int) -> CompareJob:
    doc = {"items": [{"id": n, "name": f"item {n}", "tags": ["a", "b"]} for n in range(300)]}
    other = {
        "items": [{"id": n, "name": f"item {n + i % 2}", "tags": ["b", "a"]} for n in range(300)]
    }
    ctype = [(b"content-type", b"application/json")]
    return CompareJob(
        "r",
        "t",
        f"id{i}",
        "GET",
        "/items",
        b"",
        Captured(200, ctype, orjson.dumps(doc), False, 0.01),
        Captured(200, ctype, orjson.dumps(other), False, 0.01),
        None,
    )


def worker_cpu(comp: Comparator) -> float:
    """CPU seconds of whatever compares: the child process, or the in-process feeder."""
    if comp.children:
        pid = comp.children[0].pid
        assert pid is not None
        fields = stat_fields(pid)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    feeder = comp._feeders[0]
    assert feeder.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(feeder.ident))


@pytest.mark.parametrize("processes", [1, 0])
def test_cpu_share_bounds_the_worker(processes: int) -> None:
    jobs = [heavy_job(i) for i in range(200)]
    with open_store("sqlite:///:memory:") as store:
        comp = Comparator(store, None, 10_000, cpu_share=0.1, processes=processes).start()
        for j in jobs:
            assert comp.submit(j)
        # let it get going: the child's start-up (imports) is not comparing
        deadline = time.monotonic() + 30
        while comp.stats["compared"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        cpu0, wall0 = worker_cpu(comp), time.monotonic()
        time.sleep(1.5)
        cpu1, wall1 = worker_cpu(comp), time.monotonic()
        still_queued = comp.queued
        comp.stop(60)
    share = (cpu1 - cpu0) / (wall1 - wall0)
    assert still_queued > 0, "the test needs a backlog to mean anything"
    assert cpu1 > cpu0, "nothing was compared while measuring"
    assert share < 0.2, f"worker used {share:.0%} of a core with cpu_share=0.1"


def test_stop_compares_everything_accepted() -> None:
    metrics = Metrics()
    with open_store("sqlite:///:memory:") as store:
        comp = Comparator(store, metrics, 100, flush_interval=10.0, batch=1000).start()
        for i in range(50):
            assert comp.submit(heavy_job(i))
        assert comp.stop(60)
        assert comp.stats["compared"] == 50
        assert Analysis(store).summary()[0]["compared"] == 50  # flushed on stop, not after 10 s
        # after stop, submit refuses (and counts) instead of queueing forever
        assert not comp.submit(heavy_job(0))
        assert comp.stats["dropped"] == 1


def test_submit_never_blocks_while_the_store_write_is_stuck() -> None:
    release = threading.Event()

    class Stuck:
        def __init__(self) -> None:
            self.inner = open_store("sqlite:///:memory:")
            self.options = self.inner.options

        def write(self, batch: object) -> None:
            release.wait(30)

        def sweep(self, now: float | None = None) -> int:
            return 0

    store = Stuck()
    comp = Comparator(store, None, 10, flush_interval=0.01, batch=1).start()  # type: ignore[arg-type]
    try:
        started = time.perf_counter()
        results = [comp.submit(heavy_job(i)) for i in range(200)]
        elapsed = time.perf_counter() - started
        assert elapsed < 2.0
        # the queue (10), plus at most what the feeder took: one batch for its child, and
        # the one it may be building when the loop ends
        assert results.count(True) <= 10 + 2 * BATCH_JOBS
        assert comp.stats["dropped"] == results.count(False)
    finally:
        release.set()
        comp.stop(30)
        store.inner.close()


def test_identical_answers_are_decided_at_submit_and_stored() -> None:
    """Byte-identical answers skip the worker's queue (decided by submit) but are counted,
    stored and timed exactly like compared ones; a differing one still goes through the queue."""
    ctype = [(b"content-type", b"application/json"), (b"date", b"Mon, 01 Jan 2024")]
    body = orjson.dumps({"ok": True})

    def same(i: int) -> CompareJob:
        date = [(b"date", b"Tue, 02 Jan 2024")]  # ignored by default: still identical
        return CompareJob(
            "r", "t", f"id{i}", "GET", "/x", b"",
            Captured(200, ctype, body, False, 0.010),
            Captured(200, [ctype[0], *date], body, False, 0.040),
            None,
        )  # fmt: skip

    metrics = Metrics()
    with open_store("sqlite:///:memory:") as store:
        # a queue of 5 and a long flush interval: 50 identical answers cannot be queue-bound
        comp = Comparator(store, metrics, 5, flush_interval=10.0, batch=1000).start()
        for i in range(50):
            assert comp.submit(same(i))
        assert comp.queued == 0
        differing = heavy_job(1)
        assert comp.submit(differing)
        assert comp.wait_idle(30)
        (row,) = Analysis(store).summary()
        assert (row["compared"], row["matched"], row["differing"]) == (51, 50, 1)
        lat = row["latency"]
        assert 0.008 < lat["primary_p50"] < 0.012 and 0.035 < lat["shadow_p50"] < 0.045
        assert comp.stats["compared"] == 51
        comp.stop(30)
    text = metrics.render()[0].decode()
    assert 'shadowlane_comparisons_total{result="match",route="r",target="t"} 50.0' in text
    assert 'shadowlane_comparisons_total{result="diff",route="r",target="t"} 1.0' in text


def test_stop_writes_the_identical_answers_decided_just_before() -> None:
    ctype = [(b"content-type", b"text/plain")]
    metrics = Metrics()
    with open_store("sqlite:///:memory:") as store:
        comp = Comparator(store, metrics, 10, flush_interval=10.0).start()
        for i in range(20):
            same = Captured(200, ctype, b"same", False, 0.01)
            job = CompareJob("r", "t", f"id{i}", "GET", "/", b"", same, same, None)
            assert comp.submit(job)
        assert comp.stop(30)
        assert Analysis(store).summary()[0]["matched"] == 20  # flushed on stop, not after 10 s


def big_job(i: int, size: int) -> CompareJob:
    """Two differing answers of `size` bytes each."""
    ctype = [(b"content-type", b"text/plain")]
    return CompareJob(
        "r",
        "t",
        f"big{i}",
        "GET",
        "/big",
        b"",
        Captured(200, ctype, b"a" * size, False, 0.01),
        Captured(200, ctype, b"b" * size, False, 0.01),
        None,
    )


def test_the_queue_is_bounded_in_bytes_too() -> None:
    """Answers captured up to 1 MiB each: 256 queued jobs could pin 512 MiB. `queue_bytes`
    caps what the waiting jobs hold (a job past it is dropped and counted, and `has_room`
    says no before anything is captured); an empty queue still takes a job bigger than the
    cap; bytes leave the count as the child takes the jobs."""
    mib = 1024**2
    metrics = Metrics()
    with open_store("sqlite:///:memory:") as store:
        comp = Comparator(store, metrics, 100, queue_bytes=5 * mib, flush_interval=0.05)
        assert comp.submit(big_job(0, mib))  # 2 MiB held
        assert comp.submit(big_job(1, mib))  # 4 MiB
        assert comp.has_room()
        assert not comp.submit(big_job(2, mib))  # 6 MiB would pass 5
        assert comp.submit(big_job(3, 256 * 1024))  # 4.5 MiB
        assert comp.queued == 3 and comp.queued_bytes == 4 * mib + 512 * 1024
        assert comp.stats["dropped"] == 1
        assert comp.submit(big_job(4, 256 * 1024))  # 5 MiB: at the cap
        assert not comp.has_room()
        comp.start()
        assert comp.wait_idle(60)
        assert comp.queued == 0 and comp.queued_bytes == 0
        assert comp.stats["compared"] == 4
        # nothing queued: one job of 6 MiB is taken, though past the cap
        assert comp.submit(big_job(5, 3 * mib))
        assert comp.wait_idle(60)
        assert comp.stats["compared"] == 5 and comp.queued_bytes == 0
        assert comp.stop(30)
    text = metrics.render()[0].decode()
    assert 'shadowlane_comparisons_total{result="dropped",route="r",target="t"} 1.0' in text
    assert 'shadowlane_comparisons_total{result="diff",route="r",target="t"} 5.0' in text


def child_scheduling(comp: Comparator) -> tuple[int, int]:
    """The running child's (policy, nice value), as the kernel has them, once it is past its
    start-up (it sets them before it reads its first job)."""
    pid = comp.children[0].pid
    assert pid is not None
    comp.submit(heavy_job(0))
    assert comp.wait_idle(30), "the child never compared its first job"
    return os.sched_getscheduler(pid), int(stat_fields(pid)[16])


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
@pytest.mark.parametrize(
    ("priority", "nice", "policy", "niceness"),
    [
        ("idle", 0, "SCHED_IDLE", 0),
        ("normal", 0, "SCHED_OTHER", 0),
        ("normal", 7, "SCHED_OTHER", 7),
    ],
)
def test_child_priority(priority: str, nice: int, policy: str, niceness: int) -> None:
    """`compare.priority: idle` (the default) puts the child under SCHED_IDLE, so it never
    preempts the proxy (docs/decisions.md); `normal` keeps the default policy and adds `nice`.
    The proxy's own process is left as it was."""
    own = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    with open_store("sqlite:///:memory:") as store:
        comp = Comparator(store, None, 100, priority=priority, nice=nice).start()
        try:
            got = child_scheduling(comp)
        finally:
            comp.stop(30)
    assert got == (getattr(os, policy), niceness + own[1])
    assert (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)) == own
