"""The write worker child (`python -m shadowlane.shadow.write_worker`): it prepares and checks
the big `_bulk` copies the proxy hands it (`shadow/offload.py` holds the frames and the why).

It ends when its stdin closes (the proxy stopped or died) and ignores SIGINT, SIGTERM and
SIGHUP, as the comparison child does: a signal to the process group is the proxy's to act on.
A job that raises gets the safe answer (its copy unsent and its keys suspect, or every key
suspect at its check), never a dead child.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import signal
import sys
from typing import BinaryIO

from shadowlane.compare.pool import Readable, read_exact
from shadowlane.shadow.elasticsearch import parse_request
from shadowlane.shadow.keys import SCOPE_BARRIER
from shadowlane.shadow.offload import (
    ASK,
    END,
    PREPARE,
    answer_frame,
    answer_of,
    keys_fields,
)
from shadowlane.shadow.ordering import needs
from shadowlane.shadow.writes import Prepared, Unsent, check_es, prepare_es

log = logging.getLogger("shadowlane.writes")


def prepared(
    header: tuple[object, ...], body: bytes, primary: bytes
) -> tuple[Prepared | Unsent, tuple[object, ...], bytes]:
    """A PREPARE job: the copy, the answer's header and its body (b"" when not rewritten)."""
    ids, barrier, method, target, status, answer = header
    assert isinstance(method, str) and isinstance(target, bytes) and isinstance(status, int)
    try:
        prep = prepare_es(bool(ids), bool(barrier), method, target, body, status,
                          answer_of(answer, primary))  # type: ignore[arg-type]  # fmt: skip
    except Exception as exc:  # never a dead child: the copy is not guessed at
        log.exception("preparing %s %r failed", method, target)
        keys = SCOPE_BARRIER if barrier else parse_request(method, target, b"").order_keys()
        prep = Unsent(f"preparing the copy failed: {exc!r}", keys, True)
    if isinstance(prep, Unsent):
        return prep, ("unsent", prep.reason, prep.divergent, keys_fields(prep.keys)), b""
    rewritten = prep.body is not body
    fields = ("prepared", prep.method, prep.target, rewritten, needs(prep.keys, True),
              prep.primary_status, prep.primary_truncated)  # fmt: skip
    return prep, fields, prep.body if rewritten else b""


def ended(
    prep: Prepared | None, header: tuple[object, ...], body: bytes
) -> list[tuple[str, str, str]] | None:
    """An END job: what may now differ on the target, as (label, reason, detail); None when
    the copy is not known here (the proxy marks the whole scope)."""
    if prep is None:
        return None
    reason, detail, status, answer = header
    assert isinstance(reason, str) and isinstance(detail, str) and isinstance(status, int)
    if reason:  # no answer to check: every document of the copy may differ
        return [(label, reason, detail) for label in prep.keys.labels()]
    try:
        found = check_es(prep, status, answer_of(answer, body))  # type: ignore[arg-type]
    except Exception:
        log.exception("checking %s %r failed", prep.method, prep.target)
        return [(label, "answer_unusable", "checking failed") for label in prep.keys.labels()]
    return [(d.label, d.reason, d.detail) for d in found]


def serve(stdin: Readable, stdout: BinaryIO) -> None:
    """Answer jobs until stdin closes, each as soon as it is done, in the order asked."""
    held: dict[int, Prepared] = {}
    while True:
        try:
            kind, job, header_len = ASK.unpack(read_exact(stdin, ASK.size))
        except EOFError:
            return
        header, lengths = pickle.loads(read_exact(stdin, header_len))
        bodies = [read_exact(stdin, n) for n in lengths]
        if kind == PREPARE:
            prep, result, raw = prepared(header, bodies[0], bodies[1])
            if isinstance(prep, Prepared):
                prep.body = b""  # sent (or the proxy has it); only what the end reads is kept
                if prep.es is not None:
                    prep.es.drop_body()
                held[job] = prep
            stdout.write(answer_frame(job, result, raw))
        elif kind == END:
            stdout.write(answer_frame(job, ended(held.pop(job, None), header, bodies[0])))
        else:
            raise SystemExit(f"unknown frame kind {kind}")
        stdout.flush()


#: added to the child's nice value: on a saturated machine, serving requests comes first and
#: building copies (which wait for nothing but this) after, as `compare.nice` does for the
#: comparison children
NICENESS = 10


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    logging.basicConfig(level=logging.WARNING, format="shadowlane write worker: %(message)s")
    stdin = io.BufferedReader(io.FileIO(sys.stdin.fileno(), "rb", closefd=False), 1 << 16)
    serve(stdin, sys.stdout.buffer)


if __name__ == "__main__":
    main()
