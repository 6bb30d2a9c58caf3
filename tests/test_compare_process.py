"""Comparisons decided in a child process: the same decisions and examples as in-process, the
shadow's settings reach the child, and a child that dies costs its job (counted as dropped),
not the comparator: it is started again and later jobs are compared."""

from __future__ import annotations

import os
import signal

import orjson

from shadowlane.compare import Analysis, Captured, Comparator, CompareJob, compile_settings
from shadowlane.compare.engine import decide
from shadowlane.config import ShadowCompare
from shadowlane.metrics import Metrics
from shadowlane.store import open_store
from support.wait import wait_until

JSON = [(b"content-type", b"application/json")]


def job(i: int, primary: object, candidate: object, settings: object = None) -> CompareJob:
    return CompareJob(
        "r", "t", f"id{i}", "GET", f"/items/{i}", b"",
        Captured(200, JSON, orjson.dumps(primary), False, 0.01),
        Captured(200, JSON, orjson.dumps(candidate), False, 0.02),
        None,
        settings=settings,
    )  # fmt: skip


def test_the_child_decides_as_the_process_would_and_stores_the_example() -> None:
    j = job(1, {"a": 1, "b": [1, 2], "c": "x"}, {"a": 2, "b": [1, 2], "c": "y"})
    expected = decide(j)
    assert expected.result == "diff" and sorted(expected.differing) == ["body.a", "body.c"]
    metrics = Metrics()
    with open_store("sqlite:///:memory:") as store:
        comp = Comparator(store, metrics, 10, flush_interval=10.0, processes=1).start()
        try:
            pid = comp.children[0].pid
            assert pid is not None and pid != os.getpid()
            assert comp.submit(j)
            assert comp.wait_idle(30)
            (row,) = Analysis(store).summary()
            assert (row["compared"], row["differing"]) == (1, 1)
            fields = {f["field"] for f in Analysis(store).fields("r", "t")}
            assert fields == {"body.a", "body.c"}
            (example,) = store.examples("r", "t", "body.a")
            assert example["request_id"] == "id1"
            assert example["candidate"]["values"]["body.a"] == [1, 2]
            assert comp.stats["compared"] == 1 and comp.stats["restarts"] == 0
        finally:
            assert comp.stop(30)
    assert comp.children[0].proc is None  # closed with the comparator
    text = metrics.render()[0].decode()
    assert 'shadowlane_comparisons_total{result="diff",route="r",target="t"} 1.0' in text


def test_the_shadows_settings_reach_the_child() -> None:
    """Ignore rules compiled per shadow travel once to the child and apply there."""
    settings = compile_settings(ShadowCompare(ignore=["body.a"]))
    with open_store("sqlite:///:memory:") as store:
        comp = Comparator(store, None, 100, flush_interval=10.0, processes=1).start()
        try:
            for i in range(20):
                assert comp.submit(job(i, {"a": i, "c": "x"}, {"a": -i, "c": "x "}, settings))
            assert comp.wait_idle(30)
            (row,) = Analysis(store).summary()
            assert (row["compared"], row["differing"]) == (20, 20)
            fields = {f["field"] for f in Analysis(store).fields("r", "t")}
            assert fields == {"body.c"}  # body.a ignored
        finally:
            comp.stop(30)


def test_a_killed_child_costs_its_job_and_is_started_again() -> None:
    metrics = Metrics()
    with open_store("sqlite:///:memory:") as store:
        # the child is a stand-in that reads one frame and then hangs, so the job is in flight
        # when it is killed; then the real child is started for the next jobs
        comp = Comparator(store, metrics, 100, flush_interval=10.0, processes=1)
        child = comp.children[0]
        real = child.command
        child.command = ["sh", "-c", "head -c 1 >/dev/null; exec sleep 60"]
        comp.start()
        try:
            hung = child.pid
            assert hung is not None
            assert comp.submit(job(0, {"a": 1}, {"a": 2}))
            wait_until(lambda: comp.queued == 0, 10, "the job to be taken by the feeder")
            child.command = real
            os.kill(hung, signal.SIGKILL)
            wait_until(lambda: comp.stats["dropped"] == 1, 10, "the lost job to be counted")
            assert comp.stats["restarts"] == 1
            for i in range(1, 4):
                assert comp.submit(job(i, {"a": 1}, {"a": 2}))
            assert comp.wait_idle(30)
            assert child.pid is not None and child.pid != hung
            (row,) = Analysis(store).summary()
            assert (row["compared"], row["differing"]) == (3, 3)
        finally:
            comp.stop(30)
    text = metrics.render()[0].decode()
    assert 'shadowlane_comparisons_total{result="dropped",route="r",target="t"} 1.0' in text
    assert 'shadowlane_comparisons_total{result="diff",route="r",target="t"} 3.0' in text


def test_a_pool_of_children_shares_the_queue() -> None:
    with open_store("sqlite:///:memory:") as store:
        comp = Comparator(store, None, 100, flush_interval=10.0, processes=2).start()
        try:
            pids = {c.pid for c in comp.children}
            assert len(pids) == 2 and None not in pids
            for i in range(30):
                assert comp.submit(job(i, {"a": i}, {"a": i + 1}))
            assert comp.wait_idle(60)
            assert Analysis(store).summary()[0]["compared"] == 30
        finally:
            assert comp.stop(30)
