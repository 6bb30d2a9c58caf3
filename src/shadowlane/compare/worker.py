"""The comparison child process (`python -m shadowlane.compare.worker`): it reads jobs from
stdin, decides them (`engine.decide`: lift, diff, classify, build the example while the
field's quota allows, see `ExampleQuota`), and writes
one `Decision` per job to stdout. The frames are compare/pool.py's.

It ends when its stdin closes (the proxy stopped, or died: a `kill -9` of the worker closes
the pipe too), and it ignores SIGINT, SIGTERM and SIGHUP: a terminal's Ctrl-C or a signal sent
to the whole process group is the proxy's to act on, and a draining proxy still needs its child
for the jobs queued. It runs at idle priority (`compare.priority`, see `lower_priority`), so
that on a saturated machine serving requests comes first and comparing them after.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import signal
import sys
import time
from typing import BinaryIO

from shadowlane.compare.engine import decide
from shadowlane.compare.model import CompareJob, Decision
from shadowlane.compare.pool import (
    HEAD,
    JOB,
    JOB_MORE,
    SETTINGS,
    Readable,
    frame_lengths,
    job_of,
    read_exact,
    result_frame,
)
from shadowlane.compare.settings import CompareSettings

log = logging.getLogger("shadowlane.compare")

#: added to the child's nice value unless the command line says otherwise (`compare.nice`)
NICENESS = 0
#: how the child is scheduled unless the command line says otherwise (`compare.priority`)
PRIORITY = "idle"
#: example pairs kept per field, unless the command line says otherwise
#: (`compare.examples_per_field`)
EXAMPLES_PER_FIELD = 5
#: the quota's window: the comparator's default flush interval, so each flush can still get
#: a field's full count of fresh examples
EXAMPLE_WINDOW = 1.0


class ExampleQuota:
    """Builds an example pair only while one of its fields has had fewer than `per_field`
    in the current window.

    The store keeps the newest `examples_per_field` examples of each field, and the batch of
    one flush keeps no more than that either; yet the child built one for every differing
    answer, and the example (both answers as text, the differing values) was most of what a
    differing JSON pair cost: building it here, pickling it back, unpickling it on the
    feeder thread of the proxy's process (the GIL, taken from the event loop), then dropping
    all but a few in the batch. With the quota, a field differing on every request costs one
    example per `1/per_field` of the window, and the store still gets fresh ones each flush.
    """

    __slots__ = ("_counts", "_since", "per_field", "window")

    def __init__(self, per_field: int, window: float = EXAMPLE_WINDOW) -> None:
        self.per_field = per_field
        self.window = window
        self._counts: dict[tuple[str, str, str], int] = {}
        self._since = time.monotonic()

    def wants(self, job: CompareJob, paths: list[str]) -> bool:
        if self.per_field <= 0:
            return False
        now = time.monotonic()
        if now - self._since >= self.window:
            self._counts.clear()
            self._since = now
        counts = self._counts
        keys = [(job.route, job.target, path) for path in paths]
        if all(counts.get(key, 0) >= self.per_field for key in keys):
            return False
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        return True


def serve(stdin: Readable, stdout: BinaryIO, quota: ExampleQuota | None = None) -> None:
    """Answer jobs until stdin closes: each batch (up to its `JOB` frame) is read whole, then
    decided, and its decisions are written at once (compare/pool.py's `compare_batch`)."""
    settings: dict[int, CompareSettings] = {}
    wants = quota.wants if quota is not None else None
    batch: list[tuple[CompareJob, float]] = []
    while True:
        try:
            kind, header_len, _n_bodies = HEAD.unpack(read_exact(stdin, HEAD.size))
        except EOFError:
            return
        header = read_exact(stdin, header_len)
        if kind == SETTINGS:
            token, compiled = pickle.loads(header)
            settings[token] = compiled
            continue
        if kind != JOB and kind != JOB_MORE:
            raise SystemExit(f"unknown frame kind {kind}")
        started = time.process_time()  # reading the bodies is the job's cost too
        lengths, token = frame_lengths(header)
        bodies = [read_exact(stdin, n) for n in lengths]
        batch.append((job_of(header, bodies, settings.get(token)), time.process_time() - started))
        del bodies
        if kind == JOB_MORE:
            continue
        frames = []
        batch.reverse()
        while batch:  # each job's bodies go as soon as it is decided
            job, read_cpu = batch.pop()
            started = time.process_time()
            try:
                decision = decide(job, wants)
            except Exception:
                log.exception("comparison of %s %s failed", job.method, job.uri)
                decision = Decision("error", [], [])
            del job
            decision.cpu = read_cpu + time.process_time() - started
            frames.append(result_frame(decision))
        stdout.write(b"".join(frames))
        stdout.flush()


def lower_priority(priority: str, niceness: int) -> None:
    """Schedule this process as `compare.priority` (and `compare.nice`) say; where the system
    refuses, it compares at the priority it has (tests/test_compare_engine.py reads what the
    kernel applied).

    Measured on the bench's compare-json-diff pair (2 cores that the load saturates), three
    A/B sessions: comparing cost 18-24% of req/s under the default policy, where the child,
    waking from each rest with its sleep credited, preempts the proxy's loop; 8-18% under
    SCHED_IDLE, while the child still got most of its budget (4.5-5.0 against 5.7-5.9 us of
    CPU per request) from the moments the same load leaves idle (docs/decisions.md). Where
    there is no SCHED_IDLE, nice 19 (weight 15 against the proxy's 1024) comes closest.
    """
    if priority == "idle":
        idle = getattr(os, "SCHED_IDLE", None)
        if idle is not None:
            try:
                os.sched_setscheduler(0, idle, os.sched_param(0))
                return
            except OSError:
                pass
        niceness = 19
    if niceness:
        with contextlib.suppress(OSError):  # not allowed here: compare at the same priority
            os.nice(niceness)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    niceness = int(sys.argv[1]) if len(sys.argv) > 1 else NICENESS
    per_field = int(sys.argv[2]) if len(sys.argv) > 2 else EXAMPLES_PER_FIELD
    lower_priority(sys.argv[3] if len(sys.argv) > 3 else PRIORITY, niceness)
    logging.basicConfig(level=logging.WARNING, format="shadowlane compare child: %(message)s")
    stdin = io.BufferedReader(io.FileIO(sys.stdin.fileno(), "rb", closefd=False), 1 << 16)
    serve(stdin, sys.stdout.buffer, ExampleQuota(per_field))


if __name__ == "__main__":
    main()
