"""Comparisons decided in a child process: the same decisions and examples as in-process, the
shadow's settings reach the child, and a child that dies costs its job (counted as dropped),
not the comparator: it is started again and later jobs are compared. Each test runs with both
feeders: the thread (a comparator started without a loop) and the event loop's (`start(loop)`,
what the proxy does), with the loop running in a thread of its own so the test can wait."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from shadowlane.compare import Analysis, Captured, Comparator, CompareJob, compile_settings
from shadowlane.compare.engine import decide
from shadowlane.config import ShadowCompare
from shadowlane.metrics import Metrics
from shadowlane.store import StoreOptions, open_store
from support.wait import wait_until

JSON = [(b"content-type", b"application/json")]


Start = Callable[[Comparator], Comparator]


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


@pytest.fixture(params=["thread", "loop"])
def start(request: pytest.FixtureRequest) -> Iterator[Start]:
    """How the comparator is started: `Comparator.start()`, or `start(loop)` on a loop's
    thread (the loop then stops after the test, once the comparator has)."""
    if request.param == "thread":
        yield lambda comp: comp.start()
        return
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()

    def on_loop(comp: Comparator) -> Comparator:
        async def go() -> Comparator:
            return comp.start(asyncio.get_running_loop())

        started = asyncio.run_coroutine_threadsafe(go(), loop).result(30)
        assert started._loop_feeders, "the children are fed from the loop"
        return started

    try:
        yield on_loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(30)
        loop.close()


def job(i: int, primary: object, candidate: object, settings: object = None) -> CompareJob:
    return CompareJob(
        "r", "t", f"id{i}", "GET", f"/items/{i}", b"",
        Captured(200, JSON, orjson.dumps(primary), False, 0.01),
        Captured(200, JSON, orjson.dumps(candidate), False, 0.02),
        None,
        settings=settings,
    )  # fmt: skip


def test_the_child_decides_as_the_process_would_and_stores_the_example(start: Start) -> None:
    j = job(1, {"a": 1, "b": [1, 2], "c": "x"}, {"a": 2, "b": [1, 2], "c": "y"})
    expected = decide(j)
    assert expected.result == "diff" and sorted(expected.differing) == ["body.a", "body.c"]
    metrics = Metrics()
    with open_store("sqlite:///:memory:") as store:
        comp = start(Comparator(store, metrics, 10, flush_interval=10.0, processes=1))
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


def test_the_shadows_settings_reach_the_child(start: Start) -> None:
    """Ignore rules compiled per shadow travel once to the child and apply there."""
    settings = compile_settings(ShadowCompare(ignore=["body.a"]))
    with open_store("sqlite:///:memory:") as store:
        comp = start(Comparator(store, None, 100, flush_interval=10.0, processes=1))
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


def test_a_killed_child_costs_its_job_and_is_started_again(start: Start) -> None:
    metrics = Metrics()
    with open_store("sqlite:///:memory:") as store:
        # the child is a stand-in that reads a byte of the job and then hangs, so the job is in
        # flight when it is killed; then the real child is started for the next jobs
        comp = Comparator(store, metrics, 100, flush_interval=10.0, processes=1)
        child = comp.children[0]
        real = child.command
        child.command = ["sh", "-c", "head -c 1 >/dev/null; exec sleep 60"]
        start(comp)
        try:
            hung = child.pid
            assert hung is not None
            assert comp.submit(job(0, {"a": 1}, {"a": 2}))
            # the job is the child's once its first byte is read (`head` exits, `sh` execs
            # `sleep`); "taken from the queue" is not enough: a child killed before the feeder
            # writes is found dead and replaced first, and the job is then compared, not lost
            wait_until(lambda: _comm(hung) == "sleep", 10, "the stand-in to read the job")
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


def test_a_pool_of_children_shares_the_queue(start: Start) -> None:
    with open_store("sqlite:///:memory:") as store:
        comp = start(Comparator(store, None, 100, flush_interval=10.0, processes=2))
        try:
            pids = {c.pid for c in comp.children}
            assert len(pids) == 2 and None not in pids
            for i in range(30):
                assert comp.submit(job(i, {"a": i}, {"a": i + 1}))
            assert comp.wait_idle(60)
            assert Analysis(store).summary()[0]["compared"] == 30
        finally:
            assert comp.stop(30)


def test_the_child_builds_examples_only_within_its_quota() -> None:
    """A field differing on every request costs an example pair only `examples_per_field`
    times per window (the store keeps no more than that anyway); every comparison is still
    decided and counted, and the examples the store keeps are real ones."""
    per_field = 2
    metrics = Metrics()
    with open_store("sqlite:///:memory:", StoreOptions(examples_per_field=per_field)) as store:
        comp = Comparator(store, metrics, 100, flush_interval=10.0, processes=1).start()
        try:
            started = time.monotonic()
            for i in range(40):
                assert comp.submit(job(i, {"a": i, "c": "x"}, {"a": -i - 1, "c": "x"}))
            assert comp.wait_idle(30)
            elapsed = time.monotonic() - started
            (row,) = Analysis(store).summary()
            assert (row["compared"], row["differing"]) == (40, 40)
            examples = store.examples("r", "t", "body.a")
            assert 1 <= len(examples) <= per_field
            for ex in examples:
                i = int(ex["request_id"][2:])
                assert ex["candidate"]["values"]["body.a"] == [i, -i - 1]
        finally:
            assert comp.stop(30)
    # what the child built, from its side: the examples sent back over the pipe. Without the
    # quota all 40 had one; with it at most `per_field` per window the run spanned.
    built = comp.stats.get("examples_built")
    assert built is not None and per_field <= built <= per_field * (int(elapsed) + 1), built


def test_answers_bigger_than_the_pipe_are_compared(start: Start) -> None:
    """A batch of ~1 MiB answers does not fit the pipe (64 KiB): the thread's `writev` blocks
    until the child reads, the loop's feeder writes the rest when the pipe has room."""
    big = [{"id": n, "name": "x" * 200} for n in range(4000)]
    changed = [*big[:-1], {"id": 3999, "name": "y"}]
    assert len(orjson.dumps(big)) > 800 * 1024
    with open_store("sqlite:///:memory:") as store:
        comp = start(Comparator(store, None, 100, flush_interval=10.0, processes=1))
        try:
            for i in range(6):
                assert comp.submit(job(i, big, changed))
            assert comp.wait_idle(60)
            (row,) = Analysis(store).summary()
            assert (row["compared"], row["differing"]) == (6, 6)
            fields = {f["field"] for f in Analysis(store).fields("r", "t")}
            assert fields == {"body[3999].name"}
        finally:
            assert comp.stop(30)
