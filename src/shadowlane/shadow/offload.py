"""The write worker: a child process that prepares and checks big `_bulk` copies off the loop.

Why a process: building a `_bulk` copy from the primary's answer (parse the actions, read the
primary's items, give each id-less action its id) and checking the target's answer item by item
cost 5-7 us a document in compiled code, all of it holding the GIL (orjson and mypyc never let
go of it), so a thread would stall the loop just the same: a 1 MiB bulk of small documents was
a ~50 ms stall of every client's request. In the child those milliseconds run on the other
core; the loop only moves the bytes (non-blocking pipe writes and reads) and unpickles a result
(the copy's body, its keys).

One frame per message, both ways, on the child's stdin and stdout:

    proxy -> child   kind:u8  job:u32  header_len:u32  header (pickle)  bodies...
    child -> proxy   job:u32  header_len:u32  body_len:u32  header (pickle)  body

Bodies travel raw, never inside a pickle. `PREPARE` carries the request's body (its chunks as
they were read, one `writev`) and the primary's captured answer; the child answers with the
copy's method, target and scope resources (`ordering.needs`, worked out there: with lock
escalation a big bulk holds a few resources, so its thousands of documents never cross to the
loop), the body only when it was rewritten, or why there is no copy; it keeps the copy's
actions and the primary's answer under the job's id. `END` says how the copy ended (with the
target's answer when it answered) and is answered with what may now differ on the target
(label, reason, detail), which the proxy writes to the divergence ledger. The child answers in
the order it was asked, so the proxy keeps one FIFO of callbacks. Pickle is safe here: both
ends are this program, over a pipe nobody else holds.

Bounded: bytes asked and not answered (`MAX_QUEUED_BYTES`) and checks the child holds state for
(`MAX_HELD`); past either, the caller drops the copy (counted, and in the divergence ledger).
A child that dies costs what it had: each waiting callback gets None (the ledger marks the
whole scope suspect: the copy's documents were known to the child only), and the next job
starts another child.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pickle
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable

from shadowlane.compare.model import Captured
from shadowlane.compare.pool import write_some
from shadowlane.shadow.elasticsearch import Divergent
from shadowlane.shadow.keys import OrderKeys
from shadowlane.shadow.writes import Prepared, Unsent
from shadowlane.wire.messages import Body

#: frame kinds, proxy -> child
PREPARE = 1
END = 2
ASK = struct.Struct("!BII")
ANSWER = struct.Struct("!III")
#: bytes in the pipes' kernel buffers (F_SETPIPE_SZ, where allowed): a 1 MiB body in one write
PIPE_SIZE = 1024 * 1024
#: bytes sent to the child and not answered yet; past it a new job is refused
MAX_QUEUED_BYTES = 64 * 1024 * 1024
#: copies whose end the child will hear of (it holds the primary's answer and the actions of
#: each, a few MiB for a 1 MiB bulk); past it a new big bulk is dropped
MAX_HELD = 64
#: an answer frame longer than this is a broken child (a body is at most the lane's max_body)
MAX_ANSWER = 256 * 1024 * 1024

Found = Callable[[list[Divergent] | None], None]
Built = Callable[[Prepared | Unsent | None], None]
Answer = Callable[[object, bytes], None]


def keys_fields(keys: OrderKeys) -> tuple[object, ...]:
    return (keys.items, keys.groups, keys.scope, keys.shared)


def keys_of(fields: tuple[object, ...]) -> OrderKeys:
    items, groups, scope, shared = fields
    return OrderKeys(items, groups, scope, shared)  # type: ignore[arg-type]


def answer_fields(answer: Captured | None) -> tuple[object, ...] | None:
    """What of a captured answer the child needs, its body apart (sent raw)."""
    if answer is None:
        return None
    return (answer.status, answer.headers, answer.truncated)


def answer_of(fields: tuple[object, ...] | None, body: bytes) -> Captured | None:
    if fields is None:
        return None
    status, headers, truncated = fields
    return Captured(status, headers, body, truncated, 0.0)  # type: ignore[arg-type]


def ask_frame(kind: int, job: int, header: object, bodies: list[list[bytes]]) -> list[bytes]:
    """One frame to the child: each body is a list of chunks (sent as they are, one after
    the other), and the header says each body's length."""
    lengths = [sum(len(c) for c in chunks) for chunks in bodies]
    data = pickle.dumps((header, lengths), pickle.HIGHEST_PROTOCOL)
    return [ASK.pack(kind, job, len(data)), data, *(c for chunks in bodies for c in chunks)]


def answer_frame(job: int, header: object, body: bytes = b"") -> bytes:
    data = pickle.dumps(header, pickle.HIGHEST_PROTOCOL)
    return ANSWER.pack(job, len(data), len(body)) + data + body


class WriteWorker:
    """The proxy's side of one write worker child, on one event loop (see the module doc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, command: list[str] | None = None) -> None:
        self.loop = loop
        self.command = command or [sys.executable, "-m", "shadowlane.shadow.write_worker"]
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdin = -1
        self._stdout = -1
        #: buffers not written to the child yet
        self._out: deque[memoryview] = deque()
        self._writing = False
        self._inbox = bytearray()
        #: (job, size asked, callback) per answer to come, in order
        self._waiting: deque[tuple[int, int, Answer]] = deque()
        self._queued_bytes = 0
        #: jobs whose check state the current child holds
        self._held: set[int] = set()
        self._next_job = 0
        #: children started, and jobs lost to a child's death (tests, metrics)
        self.starts = 0
        self.lost = 0
        self.closed = False
        #: why the last child could not be started
        self.start_error = ""

    # ----- asking -----
    def room(self, size: int) -> bool:
        return (
            not self.closed
            and self._queued_bytes + size <= MAX_QUEUED_BYTES
            and len(self._held) < MAX_HELD
        )

    def prepare(
        self,
        ids: bool,
        barrier: bool,
        method: str,
        target: bytes,
        body: Body,
        status: int,
        answer: Captured | None,
        done: Built,
    ) -> str:
        """Have the child run `writes.prepare_es`; `done` gets the `Prepared` (its `job` set:
        the child keeps what its end is checked against), the `Unsent`, or None (the child
        died). Returns "" when asked, else why not (no room, or no child can be started:
        nothing was asked and `done` is never called)."""
        primary = answer.body if answer is not None else b""
        size = body.size + len(primary)
        if not self.room(size):
            return "write worker full"
        if not self._start():
            return f"write worker cannot start: {self.start_error}"
        self._next_job += 1
        job = self._next_job
        header = (ids, barrier, method, target, status, answer_fields(answer))

        def built(result: object, raw: bytes) -> None:
            done(self._built(job, body, len(primary), result, raw))

        self._ask(PREPARE, job, header, [list(body.parts), [primary]], size, built)
        return ""

    def _built(
        self, job: int, body: Body, held: int, result: object, raw: bytes
    ) -> Prepared | Unsent | None:
        if result is None:
            return None
        assert isinstance(result, tuple)
        if result[0] == "unsent":
            _, reason, divergent, keys = result
            return Unsent(reason, keys_of(keys), divergent)
        _, method, target, rewritten, resources, status, truncated = result
        # its documents stayed in the child: the ledger names the whole scope if it is lost
        keys = OrderKeys(scope=True)
        keys.resources = resources
        prep = Prepared(
            method, target, raw if rewritten else body.data(), keys, None, status, b"", truncated
        )
        prep.job = job
        prep.held = held
        self._held.add(job)
        return prep

    def end(
        self,
        job: int,
        reason: str,
        detail: str,
        status: int,
        answer: Captured | None,
        found: Found,
    ) -> bool:
        """The copy the child prepared as `job` ended: `reason` "" when the target answered
        (`status`, `answer`: the child checks it item by item), else the divergence reason
        every key of the copy gets (with `detail`). `found` gets what may now differ, or None
        (the child died). With no room to ship the answer, the child names every document
        `answer_unusable` instead. False: the child holding that copy is gone (`found` is never
        called; the caller marks the whole scope in the ledger)."""
        if job not in self._held or self._proc is None:
            return False
        self._held.discard(job)
        body = answer.body if answer is not None else b""
        if body and not self.room(len(body)):
            # no room to ship the answer: the child still names the copy's documents
            reason, detail, body = "answer_unusable", "write worker full: not checked", b""

        def checked(result: object, _raw: bytes) -> None:
            if not isinstance(result, list):
                found(None)
                return
            found([Divergent(label, why, text) for label, why, text in result])

        header = (reason, detail, status, answer_fields(answer))
        self._ask(END, job, header, [[body]], len(body), checked)
        return True

    def _ask(
        self,
        kind: int,
        job: int,
        header: object,
        bodies: list[list[bytes]],
        size: int,
        callback: Answer,
    ) -> None:
        self._waiting.append((job, size, callback))
        self._queued_bytes += size
        self._send(ask_frame(kind, job, header, bodies))

    # ----- the child and its pipes -----
    def _start(self) -> bool:
        if self._proc is not None:
            return True
        try:
            proc = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
            )
        except OSError as exc:
            self.start_error = str(exc)
            return False
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        self._stdin, self._stdout = proc.stdin.fileno(), proc.stdout.fileno()
        for fd in (self._stdin, self._stdout):
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):  # not allowed here: the default 64 KiB
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.loop.add_reader(self._stdout, self._readable)
        self.starts += 1
        return True

    def _send(self, buffers: list[bytes]) -> None:
        self._out.extend(memoryview(b) for b in buffers if b)
        if not self._writing:
            self._write()

    def _write(self) -> None:
        try:
            done = write_some(self._stdin, self._out)
        except OSError:
            self._died()
            return
        if not done and not self._writing:
            self._writing = True
            self.loop.add_writer(self._stdin, self._write)
        elif done and self._writing:
            self._writing = False
            self.loop.remove_writer(self._stdin)

    def _readable(self) -> None:
        try:
            data = os.read(self._stdout, PIPE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died()
            return
        inbox = self._inbox
        inbox += data
        pos = 0
        while len(inbox) - pos >= ANSWER.size:
            job, header_len, body_len = ANSWER.unpack_from(inbox, pos)
            owed = self._waiting[0][0] if self._waiting else -1
            if header_len + body_len > MAX_ANSWER or job != owed:  # a broken child
                self._died()
                return
            start = pos + ANSWER.size
            end = start + header_len + body_len
            if len(inbox) < end:
                break
            header = bytes(inbox[start : start + header_len])
            body = bytes(inbox[start + header_len : end])
            pos = end
            _job, size, callback = self._waiting.popleft()
            self._queued_bytes -= size
            # each answer in a loop turn of its own: timers (a client's timeout, the lag
            # probe) run between two big copies
            self.loop.call_soon(self._answered, header, body, callback)
        del inbox[:pos]

    def _answered(self, header: bytes, body: bytes, callback: Answer) -> None:
        try:
            result = pickle.loads(header)
        except Exception:  # a broken child: this answer is lost, the ones after it too
            result = None
            self._died()
        callback(result, body)

    def _died(self) -> None:
        """The child is gone or broken: every answer it owed is lost (None), its state too."""
        if not self._stop_child():
            return
        waiting, self._waiting = self._waiting, deque()
        self._queued_bytes = 0
        self.lost += len(waiting) + len(self._held)
        self._held.clear()
        for _job, _size, callback in waiting:
            callback(None, b"")

    def _stop_child(self) -> bool:
        """Kill and reap the child, if there is one (True), and let go of its pipes."""
        proc = self._proc
        if proc is None:
            return False
        self._proc = None
        if not self.loop.is_closed():
            self.loop.remove_reader(self._stdout)
            if self._writing:
                self.loop.remove_writer(self._stdin)
        self._writing = False
        self._out.clear()
        self._inbox.clear()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1.0)
        return True

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def held(self) -> int:
        return len(self._held)

    def close(self) -> None:
        """Kill the child for good (shutdown): what it owed is lost, as when it dies."""
        self.closed = True
        self._died()


_WORKERS: dict[asyncio.AbstractEventLoop, WriteWorker] = {}


def write_worker() -> WriteWorker:
    """The write worker of the running loop (one per process in the proxy), started lazily:
    its child only starts with the first big `_bulk`."""
    loop = asyncio.get_running_loop()
    worker = _WORKERS.get(loop)
    if worker is None or worker.closed:
        for old in [lp for lp in _WORKERS if lp.is_closed()]:
            _WORKERS.pop(old).close()
        worker = _WORKERS[loop] = WriteWorker(loop)
    return worker


def write_worker_stats() -> tuple[int, int, int, int]:
    """(bytes asked and not answered, copies held, children started, copies lost to a dead
    child) over this process's write workers, for the instance's gauges; zeros before the
    first big `_bulk` (nothing is started to answer this)."""
    queued = held = starts = lost = 0
    for worker in _WORKERS.values():
        queued += worker.queued_bytes
        held += worker.held
        starts += worker.starts
        lost += worker.lost
    return queued, held, starts, lost


def close_write_workers() -> None:
    """Stop every write worker's child (the instance's shutdown, after the lanes drained)."""
    while _WORKERS:
        _WORKERS.popitem()[1].close()
