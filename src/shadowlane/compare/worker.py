"""The comparison child process (`python -m shadowlane.compare.worker`): it reads jobs from
stdin, decides them (`engine.decide`: lift, diff, classify, build the example), and writes
one `Decision` per job to stdout. The frames are compare/pool.py's.

It ends when its stdin closes (the proxy stopped, or died: a `kill -9` of the worker closes
the pipe too), and it ignores SIGINT, SIGTERM and SIGHUP: a terminal's Ctrl-C or a signal sent
to the whole process group is the proxy's to act on, and a draining proxy still needs its child
for the jobs queued. It can run at a lower priority (`compare.nice`), so that on a saturated
machine serving requests comes first and comparing them after.
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
from shadowlane.compare.model import Decision
from shadowlane.compare.pool import (
    HEAD,
    JOB,
    RESULT,
    SETTINGS,
    Readable,
    frame_lengths,
    job_of,
    read_exact,
)
from shadowlane.compare.settings import CompareSettings

log = logging.getLogger("shadowlane.compare")

#: added to the child's nice value unless the command line says otherwise (`compare.nice`)
NICENESS = 0


def serve(stdin: Readable, stdout: BinaryIO) -> None:
    """Answer jobs until stdin closes."""
    settings: dict[int, CompareSettings] = {}
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
        if kind != JOB:
            raise SystemExit(f"unknown frame kind {kind}")
        started = time.process_time()  # reading the bodies is the job's cost too
        lengths, token = frame_lengths(header)
        bodies = [read_exact(stdin, n) for n in lengths]
        job = job_of(header, bodies, settings.get(token))
        try:
            decision = decide(job)
        except Exception:
            log.exception("comparison of %s %s failed", job.method, job.uri)
            decision = Decision("error", [], [])
        decision.cpu = time.process_time() - started
        out = pickle.dumps(decision, pickle.HIGHEST_PROTOCOL)
        stdout.write(RESULT.pack(len(out)) + out)
        stdout.flush()


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    niceness = int(sys.argv[1]) if len(sys.argv) > 1 else NICENESS
    with contextlib.suppress(OSError):  # not allowed here: compare at the same priority
        if niceness:
            os.nice(niceness)
    logging.basicConfig(level=logging.WARNING, format="shadowlane compare child: %(message)s")
    stdin = io.BufferedReader(io.FileIO(sys.stdin.fileno(), "rb", closefd=False), 1 << 16)
    serve(stdin, sys.stdout.buffer)


if __name__ == "__main__":
    main()
