"""The proxy's side of a comparison child: starting it, the frames both sides speak, one job at
a time over its pipes.

Why a process and not the comparator's thread: lifting a ~1 MiB JSON answer (orjson) and
diffing it hold the GIL for tens of milliseconds at a time, and `cpu_share` could bound how
often that happened, not how long each stall was. In a child (compare/worker.py) the parse and
the diff run in their own interpreter; the proxy's process only moves bytes (a `writev` of the
bodies, which releases the GIL) and reads back a `Decision` of a few hundred bytes (or a few
tens of KiB with an example: each body in it is cut to `EXAMPLE_BODY_CAP`).

One frame per message, both ways, on the child's stdin and stdout:

    proxy -> child   kind:u8  header_len:u32  body_count:u8  header (pickle)  bodies...
    child -> proxy   length:u32  decision (its fields as a pickled tuple)

A job's header is the `CompareJob` with every body replaced by b"" and their lengths listed;
the bodies follow raw, so each is sent once, as captured, without being copied into a pickle.
A `SETTINGS` frame carries one `CompareSettings` and the token jobs name it by; it is sent once
per child (settings change only on a reload). Jobs go in batches: every job but the last of a
batch is a `JOB_MORE` frame; the child reads up to the `JOB` frame that ends the batch, then
answers every job of it, in order, with one `Decision` each, all in one write. Pickle is safe
here: both ends are this program, over a pipe nobody else holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import operator
import os
import pickle
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import Protocol

from shadowlane.compare.model import Captured, CompareJob, Decision
from shadowlane.compare.settings import CompareSettings


class Readable(Protocol):
    """A raw pipe (`FileIO`) or a buffered one: what `read_exact` reads from."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


#: frame kinds, parent -> child
JOB = 1
SETTINGS = 2
#: a job of a batch that goes on: the child reads on before it answers (see compare_batch)
JOB_MORE = 3
HEAD = struct.Struct("!BIB")
RESULT = struct.Struct("!I")
#: the proxy reads a child's results through a buffer this big: most result frames fit whole
RESULT_BUFFER = 64 * 1024
#: a result frame longer than this is a broken child, not a result (examples are cut to 64 KiB
#: per answer and 50 values)
MAX_RESULT = 64 * 1024**2


# -- framing ------------------------------------------------------------------------------------


#: field names, read once: a job travels as plain tuples of its fields (generic, so a field
#: added to `Captured` or `CompareJob` travels too), which pickles several times faster than
#: copying the dataclasses to blank their bodies
_CAPTURED_FIELDS = tuple(f.name for f in dataclasses.fields(Captured))
_JOB_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(CompareJob)
    if f.name not in ("primary", "candidate", "secondary", "settings")
)
_BODY = _CAPTURED_FIELDS.index("body")
#: one C call per answer and per job for all their fields (a generator of getattr calls was
#: most of what framing a job cost the feeder thread, with the GIL)
_captured_values = operator.attrgetter(*_CAPTURED_FIELDS)
_job_values = operator.attrgetter(*_JOB_FIELDS)


def _answer_fields(c: Captured) -> tuple[object, ...]:
    values = list(_captured_values(c))
    values[_BODY] = b""
    return tuple(values)


def job_frame(job: CompareJob, settings_token: int, more: bool = False) -> list[bytes]:
    """The buffers of one JOB frame (`JOB_MORE` when `more` jobs of its batch follow), for
    one `writev`: the bodies themselves are among them (not copied), and only the small rest
    of the job is pickled."""
    answers = [job.primary, job.candidate]
    if job.secondary is not None:
        answers.append(job.secondary)
    header = pickle.dumps(
        (
            _job_values(job),
            [_answer_fields(a) for a in answers],
            [len(a.body) for a in answers],
            settings_token,
        ),
        pickle.HIGHEST_PROTOCOL,
    )
    kind = JOB_MORE if more else JOB
    return [HEAD.pack(kind, len(header), len(answers)), header, *(a.body for a in answers)]


def job_of(header: bytes, bodies: list[bytes], settings: CompareSettings | None) -> CompareJob:
    """The child's side of `job_frame`: the job again, bodies put back."""
    fields, answers, _lengths, _token = pickle.loads(header)
    captured = []
    for values, body in zip(answers, bodies, strict=True):
        kw = dict(zip(_CAPTURED_FIELDS, values, strict=True))
        kw["body"] = body
        captured.append(Captured(**kw))
    job = CompareJob(
        **dict(zip(_JOB_FIELDS, fields, strict=True)),
        primary=captured[0],
        candidate=captured[1],
        secondary=captured[2] if len(captured) > 2 else None,
        settings=settings,
    )
    return job


def frame_lengths(header: bytes) -> tuple[list[int], int]:
    """The body lengths a JOB frame's header announces, and its settings token."""
    _fields, _answers, lengths, token = pickle.loads(header)
    return lengths, token


def settings_frame(token: int, settings: CompareSettings) -> list[bytes]:
    header = pickle.dumps((token, settings), pickle.HIGHEST_PROTOCOL)
    return [HEAD.pack(SETTINGS, len(header), 0), header]


#: buffers one `writev` takes at most (Linux's IOV_MAX): past it the call fails with EINVAL
IOV_MAX = 1024


def write_some(fd: int, out: deque[memoryview] | list[memoryview]) -> bool:
    """Write the front of `out` to `fd` until all of it is out (True) or the descriptor takes
    no more for now (a non-blocking pipe that is full: False, `out` holds what is left).

    The one partial-`writev` loop of the program, for the comparison child's pipe
    (`write_all`, the loop's feeder) and the write worker's. What was written is dropped from
    the front of `out`; a buffer written in part stays as a view of its rest (a memoryview
    slice: nothing is copied, so the views must be of bytes, one byte an item). Each `writev`
    takes at most `IOV_MAX` buffers. An OSError other than BlockingIOError (the child is
    gone: EPIPE) propagates, `out` as the last write left it. The GIL is released while the
    kernel copies."""
    while out:
        chunk: Sequence[memoryview] = out
        if len(out) > IOV_MAX:
            chunk = out[:IOV_MAX] if isinstance(out, list) else list(islice(out, IOV_MAX))
        try:
            n = os.writev(fd, chunk)
        except BlockingIOError:
            return False
        if isinstance(out, list):
            whole = 0
            left = len(out)
            while whole < left and n >= len(out[whole]):
                n -= len(out[whole])
                whole += 1
            del out[:whole]
        else:
            while out and n >= len(out[0]):
                n -= len(out.popleft())
        if n:
            out[0] = out[0][n:]
    return True


def write_all(fd: int, buffers: list[bytes]) -> None:
    """Write every byte of `buffers` to a blocking `fd` (`write_some` until all is out: a pipe
    takes a big body in several goes). A non-blocking one that fills up raises
    BlockingIOError, as a bare `writev` would."""
    views = [memoryview(b) for b in buffers if b]
    if not write_some(fd, views):
        raise BlockingIOError(errno.EAGAIN, "write_all: the descriptor is non-blocking and full")


def read_exact(stream: Readable, n: int) -> bytes:
    """Exactly `n` bytes, or EOFError when the other side closed first."""
    if n == 0:
        return b""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise EOFError(f"pipe closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


#: a decision travels back as the plain tuple of its fields, in this order: unpickling a
#: tuple and building the (compiled) `Decision` from it takes a quarter of the time of
#: unpickling the object itself, on the feeder thread, with the GIL
_DECISION_FIELDS = tuple(f.name for f in dataclasses.fields(Decision))
_decision_values = operator.attrgetter(*_DECISION_FIELDS)


def result_frame(decision: Decision) -> bytes:
    """The child's answer to one job: the frame `read_result` reads."""
    out = pickle.dumps(_decision_values(decision), pickle.HIGHEST_PROTOCOL)
    return RESULT.pack(len(out)) + out


def read_result(stream: Readable) -> Decision:
    (length,) = RESULT.unpack(read_exact(stream, RESULT.size))
    if length > MAX_RESULT:
        raise EOFError(f"result frame of {length} bytes: the comparison child is broken")
    return decision_of(read_exact(stream, length))


def decision_of(payload: bytes) -> Decision:
    """The `Decision` a result frame's payload (after its length) carries; EOFError when it
    is not one (a broken child)."""
    values = pickle.loads(payload)
    if not isinstance(values, tuple) or len(values) != len(_DECISION_FIELDS):
        raise EOFError("the comparison child sent something that is not a decision")
    try:
        return Decision(*values)
    except TypeError as exc:
        raise EOFError(f"the comparison child sent a broken decision: {exc}") from exc


class ChildDied(Exception):
    """The child is gone (or sent garbage) before answering: its job is lost."""


class ChildProcess:
    """One comparison child and its two pipes; used by one thread at a time.

    `compare` blocks that thread (never the event loop) until the child answers. Any failure
    closes the child and raises `ChildDied`; the next `compare` starts a new one.
    """

    def __init__(
        self,
        command: list[str] | None = None,
        nice: int = 0,
        examples_per_field: int = 5,
        priority: str = "idle",
    ) -> None:
        self.command = command or [
            sys.executable, "-m", "shadowlane.compare.worker", str(nice), str(examples_per_field),
            priority,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        #: the child's stdout, buffered: a result frame (its length, then the pickle, written
        #: at once by the child) is then one `read` of the pipe, not two; each read releases
        #: and takes back the GIL, which the event loop is made to hand over
        self._results: io.BufferedReader | None = None
        #: settings tokens this child has been sent
        self._sent: set[int] = set()
        #: children started, the first included
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        if self.proc is not None:
            return
        try:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                close_fds=True,
            )
        except OSError as exc:
            raise ChildDied(f"cannot start the comparison child: {exc}") from exc
        assert self.proc.stdout is not None
        self._results = io.BufferedReader(self.proc.stdout, RESULT_BUFFER)  # type: ignore[arg-type]
        self._sent = set()
        self.starts += 1

    def compare_batch(
        self,
        jobs: Sequence[CompareJob],
        tokens: Sequence[tuple[int, CompareSettings | None]],
        idle: bool = True,
    ) -> list[Decision]:
        """Have the child decide `jobs`, each with its settings' (token, settings): all are
        written with one `writev`, the child reads the whole batch before it decides any
        (so neither side can block writing while the other does too), and it answers all of
        them in one write, so the feeder's thread wakes once per batch. A child that dies
        costs the whole batch.

        `idle`: the child has been waiting since its last answer, so it is asked first
        whether it is still alive (a `waitpid`): one that died while idle is started again
        before the batch, which is then not lost. Between batches that follow each other (a
        busy feeder) the question is not asked: it cost a syscall, a GIL hand-over and
        interpreted code each time, and a child that died in the instant between two batches
        costs that next batch (counted `dropped`) and is started again."""
        if idle and self.proc is not None and self.proc.poll() is not None:
            self.kill()  # died while idle: start another before this job, which is not lost
        self.start()
        proc = self.proc
        results = self._results
        assert proc is not None and proc.stdin is not None and results is not None
        try:
            write_all(proc.stdin.fileno(), self.batch_frames(jobs, tokens))
            return [read_result(results) for _ in jobs]
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
            self.kill()
            raise ChildDied(f"comparison child {proc.pid} died: {exc}") from exc

    def batch_frames(
        self, jobs: Sequence[CompareJob], tokens: Sequence[tuple[int, CompareSettings | None]]
    ) -> list[bytes]:
        """The buffers of one batch for this child: the settings it has not had yet, then
        the jobs (all but the last `JOB_MORE`)."""
        buffers: list[bytes] = []
        last = len(jobs) - 1
        for i, job in enumerate(jobs):
            token, settings = tokens[i]
            if settings is not None and token not in self._sent:
                buffers += settings_frame(token, settings)
                self._sent.add(token)
            buffers += job_frame(job, token, more=i < last)
        return buffers

    def pipes(self) -> tuple[int, int]:
        """The child's stdin and stdout descriptors, made non-blocking: for a feeder that
        runs on the event loop (engine's `_LoopFeeder`), which must never wait on them."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        fds = proc.stdin.fileno(), proc.stdout.fileno()
        for fd in fds:
            os.set_blocking(fd, False)
        return fds

    def close(self, timeout: float = 5.0) -> None:
        """Close its stdin (it exits at EOF) and reap it; kill it past `timeout`."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        self._results = None
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        self._results = None
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
