"""The record writer: one thread per process that turns handed-over records into files.

Why a thread that polls: the event loop must never wait for a disk, and must not pay a thread
wake-up per record either (a `queue.Queue` put notifies the waiting thread every time, and at
thousands of records a second those wake-ups and GIL hand-overs cost the loop more than the
records, as the comparator found, compare/engine.py). Each `Recorder` holds a deque the loop
appends to; this thread looks every `poll_interval`, takes what is there, and does all the work:
redaction, GoReplay encoding, gzip, the writes and the index.
Without redaction, a pass takes each recorder's records in one compiled slice (`take_encoded`),
compresses and writes them in one call each: the fewer times the writer takes the GIL, the less
the two threads pay in futex waits and context switches. With redaction (interpreted, slower)
it gives the GIL back every `YIELD_EVERY` records instead.

Files: `<dir>/<route>[@<target>]-<host>-<pid>-<UTC start>.gor[.gz]`, one series per recording,
started on the first record and rotated past `max_file_size` bytes or `max_file_age`. A file is
written in blocks, each ended every `index_records` records or `index_interval` seconds: a block
is one gzip member (so a reader can start decompressing at its offset) and one line of the
`.idx` beside the file, `{"offset", "length", "records", "ts", "min_ts", "max_ts"}` (times are
the records' nanosecond timestamps), which is what `record.index.iter_since` seeks with. A
record counts `written` once its block is on disk (flushed to the kernel).

Errors: a write that fails (disk full, directory gone) loses the block it was in: the file is
cut back to the block's start (so it stays readable) and closed, the block's records count
`error`, the error is logged at most once per `error_log_interval` per recording, and records
count `error` without a try until a new file is tried a second later. Nothing is raised into
the loop, whose only contact is the deque.

Bounded: the loop drops what would pass a recording's `queue` bytes (see recorder.py); the
writer holds at most one block's compressor state per file besides.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import IO, Protocol

from shadowlane.compare.redact import Redaction, Unredactable
from shadowlane.config import RecordConfig
from shadowlane.record.goreplay import REQUEST, RESPONSE, FormatError, Payload, encode
from shadowlane.record.recorder import (
    Recorder,
    RecordItem,
    Unencodable,
    encode_item,
    payload_id,
    take_encoded,
)
from shadowlane.record.redact import answer_message, redact_head

log = logging.getLogger("shadowlane.record")

#: how long new records may wait before the writer looks
POLL_INTERVAL = 0.02
#: records per index block (and gzip member), at most ...
INDEX_RECORDS = 1000
#: ... and seconds per block: data reaches the disk at least this often
INDEX_INTERVAL = 1.0
#: records worked through before the writer lets the event loop have the GIL (redaction path)
YIELD_EVERY = 32
#: records the compiled fast path encodes in one go: each time the writer takes and gives up
#: the GIL while the loop wants it costs both threads a futex wait and a context switch
#: (measured: with slices of 32, 5 us of kernel time per request between the two threads), so
#: it takes it as few times as it can; a slice holds it about 1 us per record
FAST_SLICE = 1000
#: zlib level: 1 is about 3x faster than the default 6 for 10-20% bigger files, and the
#: writer shares the proxy's cores
GZIP_LEVEL = 1
#: a recording of a replaced generation is closed once it has had nothing for this long (its
#: in-flight requests are done by then: it is the longest default backend timeout)
RETIRE_GRACE = 30.0
#: after a failed write, records count `error` without a try for this long
RETRY_AFTER = 1.0
ERROR_LOG_INTERVAL = 10.0


class RecordCounter(Protocol):
    """What the writer needs of `shadowlane.metrics.Metrics`."""

    def record_written(self, route: str, target: str, outcome: str, n: int) -> None: ...

    def set_gauge_provider(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...],
        fn: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
    ) -> None: ...


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", text) or "_"


class _File:
    """One open recording file, written in blocks."""

    def __init__(self, path: str, gz: bool) -> None:
        self.path = path
        self.gz = gz
        self.fh: IO[bytes] = open(path, "xb", buffering=0)  # noqa: SIM115 - closed by close()
        try:
            self.idx: IO[str] = open(path + ".idx", "x", encoding="utf-8")  # noqa: SIM115
        except BaseException:
            self.fh.close()
            raise
        self.opened = time.monotonic()
        self.size = 0
        self._comp: zlib._Compress | None = None
        #: records added since the last compress (one compress call per slice, not per
        #: record: each call gives up the GIL, and a hand-over per record costs the loop)
        self._raw: list[bytes] = []
        self._raw_size = 0
        self._out: list[bytes] = []
        self.block_offset = 0
        self.block_started = 0.0
        self.block_records = 0
        self.block_first = 0
        self.block_min = 0
        self.block_max = 0

    @property
    def in_block(self) -> bool:
        return self.block_records > 0

    def add(self, data: bytes, ts_ns: int) -> None:
        self.add_many(data, 1, ts_ns, ts_ns, ts_ns)

    def add_many(self, data: bytes, n: int, first: int, lo: int, hi: int) -> None:
        """`n` records (joined in `data`), the first stamped `first`, all within [lo, hi]."""
        if n <= 0:
            return
        if self.block_records == 0:
            self.block_offset = self.size
            self.block_started = time.monotonic()
            self.block_first, self.block_min, self.block_max = first, lo, hi
            if self.gz:
                self._comp = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        else:
            self.block_min = min(self.block_min, lo)
            self.block_max = max(self.block_max, hi)
        self.block_records += n
        self._raw.append(data)
        self._raw_size += len(data)

    @property
    def approx_size(self) -> int:
        """Bytes on disk once what is buffered is written (uncompressed: exactly)."""
        return self.size + (0 if self.gz else self._raw_size)

    def _pack(self) -> None:
        if not self._raw:
            return
        data = b"".join(self._raw)
        self._raw = []
        self._raw_size = 0
        if self._comp is not None:
            data = self._comp.compress(data)
        if data:
            self._out.append(data)
            self.size += len(data)

    def write_out(self) -> None:
        """Hand what is buffered to the kernel (one write)."""
        self._pack()
        if self._out:
            data = b"".join(self._out)
            self._out = []
            view = memoryview(data)
            while view:
                n = self.fh.write(view)
                view = view[n or 0 :]

    def end_block(self) -> int:
        """Finish the block (its gzip member), write it and its index line; its records."""
        n = self.block_records
        if n == 0:
            return 0
        self._pack()
        if self._comp is not None:
            tail = self._comp.flush()
            self._comp = None
            self._out.append(tail)
            self.size += len(tail)
        self.write_out()
        line = {
            "offset": self.block_offset,
            "length": self.size - self.block_offset,
            "records": n,
            "ts": self.block_first,
            "min_ts": self.block_min,
            "max_ts": self.block_max,
        }
        self.idx.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.idx.flush()
        self.block_records = 0
        return n

    def abort_block(self) -> int:
        """A write failed: drop the block, cut the file back to its start; its records."""
        n = self.block_records
        self.block_records = 0
        self._comp = None
        self._raw = []
        self._raw_size = 0
        self._out = []
        with contextlib.suppress(OSError):
            self.fh.truncate(self.block_offset)
        self.size = self.block_offset
        return n

    def close(self) -> None:
        for f in (self.fh, self.idx):
            with contextlib.suppress(OSError):
                f.close()


class _Sink:
    """One recording's file series and its rules; touched by the writer thread only."""

    def __init__(
        self, recorder: Recorder, cfg: RecordConfig, redaction: Redaction | None, host: str
    ) -> None:
        self.recorder = recorder
        self.cfg = cfg
        self.redaction = redaction
        name = recorder.route + (f"@{recorder.target}" if recorder.target else "")
        self.prefix = f"{_safe(name)}-{host}"
        self.file: _File | None = None
        self.retired_at: float | None = None
        self.last_item = time.monotonic()
        self.retry_at = 0.0
        self.last_error_log = -ERROR_LOG_INTERVAL
        self.suppressed = 0
        self.stats = {"written": 0, "error": 0, "files": 0}

    @property
    def label(self) -> tuple[str, str]:
        return self.recorder.route, self.recorder.target


class RecordWriter:
    """Every recording of a process; `start`, `stop` and `add`/`retire` are called from the
    loop's thread, everything else happens on the writer's."""

    def __init__(
        self,
        metrics: RecordCounter | None,
        *,
        poll_interval: float = POLL_INTERVAL,
        index_records: int = INDEX_RECORDS,
        index_interval: float = INDEX_INTERVAL,
        retire_grace: float = RETIRE_GRACE,
    ) -> None:
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.index_records = index_records
        self.index_interval = index_interval
        self.retire_grace = retire_grace
        self.host = _safe(socket.gethostname())
        #: replaced whole (never changed in place) so the writer iterates a stable list
        self._sinks: list[_Sink] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: tests and `stop` wait on it: every record taken so far is on disk or counted
        self._idle = threading.Condition()
        self._passes = 0
        self._flush_asked = False
        if metrics is not None:
            metrics.set_gauge_provider(
                "shadowlane_record_pending_bytes",
                "Bytes of recorded requests waiting for the record writer, per recording.",
                ("route", "target"),
                self._pending,
            )

    def _pending(self) -> list[tuple[tuple[str, ...], float]]:
        totals: dict[tuple[str, str], float] = {}
        for s in self._sinks:
            totals[s.label] = totals.get(s.label, 0.0) + float(s.recorder.pending)
        return [((route, target), v) for (route, target), v in totals.items()]

    # ----- the loop's side -----
    def add(self, recorder: Recorder, cfg: RecordConfig, redaction: Redaction | None) -> None:
        """Start writing a recorder's records (its directory is made now, so a config naming
        one that cannot be made fails here, at start or reload, not on the first request)."""
        os.makedirs(cfg.dir, exist_ok=True)
        if not os.access(cfg.dir, os.W_OK | os.X_OK):
            raise PermissionError(f"record dir {cfg.dir}: not writable")
        with self._lock:
            self._sinks = [*self._sinks, _Sink(recorder, cfg, redaction, self.host)]

    def retire(self, recorders: Iterable[Recorder], *, at_once: bool = False) -> None:
        """A reload replaced these recorders: their files close once they have been idle for
        `retire_grace` (requests that started on them still finish there); `at_once` for
        recorders that never served (a reload that failed half-way)."""
        gone = set(map(id, recorders))
        now = time.monotonic() - (self.retire_grace if at_once else 0.0)
        for s in self._sinks:
            if id(s.recorder) in gone and s.retired_at is None:
                s.retired_at = now
                if at_once:
                    s.last_item = now

    def start(self) -> RecordWriter:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="shadowlane-record-writer", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """Write what is queued, close every file, join; False if that took past `timeout`
        (a disk that does not take writes: what is left is lost, the thread is a daemon)."""
        for s in self._sinks:
            s.recorder.closed = True
        self._stopping = True
        thread = self._thread
        if thread is None:
            for s in self._sinks:
                self._drain(s, final=True)
                self._close(s)
            return True
        self._wake.set()
        thread.join(timeout)
        return not thread.is_alive()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until everything handed over so far is written (or counted) and every open
        block is on disk: for tests and for `replay` reading a live directory."""
        deadline = time.monotonic() + timeout
        with self._idle:
            start = self._passes
            self._flush_asked = True
            self._wake.set()
            # two full passes after the ask: the first may have begun before it
            while self._passes < start + 2 or any(s.recorder.items for s in self._sinks):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._flush_asked = True
                self._wake.set()
                self._idle.wait(min(remaining, self.poll_interval))
        return True

    # ----- the writer's thread -----
    def _run(self) -> None:
        while True:
            stopping = self._stopping
            flush = self._flush_asked
            self._flush_asked = False
            now = time.monotonic()
            for s in self._sinks:
                self._drain(s, final=stopping)
                self._tick(s, now, flush or stopping)
            self._reap(now)
            with self._idle:
                self._passes += 1
                self._idle.notify_all()
            if stopping and not any(s.recorder.items for s in self._sinks):
                for s in self._sinks:
                    self._close(s)
                return
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def _drain(self, s: _Sink, final: bool) -> None:
        """Take what the loop handed over, in slices of YIELD_EVERY: each slice is encoded,
        written, and only then given back to the loop's byte bound (`done`), so the bound
        covers what the writer holds too, and a disk that blocks holds the pending bytes at
        `queue` rather than letting them pile up here."""
        items = s.recorder.items
        if s.redaction is None and items:
            self._drain_fast(s, final)
            return
        took = False
        while items:
            size = 0
            for _ in range(YIELD_EVERY):
                if not items:
                    break
                item = items.popleft()
                size += item.size
                self._write(s, item)
            f = s.file
            if f is not None:
                try:
                    f.write_out()
                    if f.size >= s.cfg.max_file_size:
                        self._close(s)
                except OSError as err:
                    self._failed(s, err, 0)
            s.recorder.done += size
            took = True
            if not final:
                time.sleep(0)  # let the event loop have the GIL between small slices
        if took:
            s.last_item = time.monotonic()

    def _drain_fast(self, s: _Sink, final: bool) -> None:
        """`_drain` without redaction: each slice is taken and encoded by compiled code
        (`take_encoded`), and never crosses an index block's end."""
        rec = s.recorder
        while rec.items:
            f = s.file
            if f is None and time.monotonic() < s.retry_at:
                sl = take_encoded(rec, FAST_SLICE)  # the disk failed a moment ago
                self._count(s, "error", sl.count + sl.errors)
                rec.done += sl.size
                continue
            try:
                if f is None:
                    f = s.file = self._open(s)
            except OSError as err:
                sl = take_encoded(rec, FAST_SLICE)
                rec.done += sl.size
                self._failed(s, err, sl.count + sl.errors)
                continue
            sl = take_encoded(rec, min(FAST_SLICE, self.index_records - f.block_records))
            if sl.errors:
                self._count(s, "error", sl.errors)
                self._log(s, f"{sl.errors} request(s) not recorded: the payload separator")
            try:
                f.add_many(sl.data, sl.count, sl.first_ts, sl.min_ts, sl.max_ts)
                if f.block_records >= self.index_records:
                    self._count(s, "written", f.end_block())
                else:
                    f.write_out()
                if f.approx_size >= s.cfg.max_file_size:
                    self._close(s)
            except OSError as err:
                self._failed(s, err, 0)
            rec.done += sl.size
        s.last_item = time.monotonic()

    def _tick(self, s: _Sink, now: float, flush: bool) -> None:
        f = s.file
        if f is None:
            return
        try:
            if f.in_block and (flush or now - f.block_started >= self.index_interval):
                self._count(s, "written", f.end_block())
            else:
                f.write_out()
            if now - f.opened >= s.cfg.max_file_age:
                self._close(s)
        except OSError as err:
            self._failed(s, err, 0)

    def _reap(self, now: float) -> None:
        done = [
            s
            for s in self._sinks
            if s.retired_at is not None
            and not s.recorder.items
            and now - max(s.retired_at, s.last_item) >= self.retire_grace
        ]
        if not done:
            return
        for s in done:
            s.recorder.closed = True
            self._drain(s, final=True)  # what came between the check and the close
            self._close(s)
        with self._lock:
            self._sinks = [s for s in self._sinks if s not in done]

    def _message(self, s: _Sink, item: RecordItem) -> bytes:
        red = s.redaction
        if red is None:
            return encode_item(item)  # compiled, one join
        data = redact_head(item.head, item.body, red)
        head_request = item.head.startswith(b"HEAD ")
        pid = payload_id(item.request_id)
        out = encode(Payload(REQUEST, pid, item.ts_ns, 0, data))
        ans = item.answer
        if ans is not None:
            try:
                answer = answer_message(ans, red, head_request)
            except Unredactable as err:
                self._log(s, f"answer not recorded (redaction): {err}")
            else:
                latency = item.latency_ns or int(ans.seconds * 1e9)
                out += encode(Payload(RESPONSE, pid, item.ts_ns, latency, answer))
        return out

    def _write(self, s: _Sink, item: RecordItem) -> None:
        try:
            data = self._message(s, item)
        except (Unredactable, FormatError, Unencodable) as err:
            self._count(s, "error", 1)
            self._log(s, f"request not recorded: {err}")
            return
        except Exception as err:  # a bug must cost the record, never the writer
            self._count(s, "error", 1)
            log.exception("recording %s: encoding a record failed", s.prefix)
            self._log(s, f"request not recorded: {err!r}")
            return
        now = time.monotonic()
        if s.file is None and now < s.retry_at:
            self._count(s, "error", 1)
            s.suppressed += 1
            return
        try:
            f = s.file
            if f is None:
                f = s.file = self._open(s)
            f.add(data, item.ts_ns)
            if f.block_records >= self.index_records:
                self._count(s, "written", f.end_block())
            if f.approx_size >= s.cfg.max_file_size:
                self._close(s)
        except OSError as err:
            self._failed(s, err, 1 if s.file is None else 0)

    def _open(self, s: _Sink) -> _File:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        suffix = ".gor.gz" if s.cfg.gzip else ".gor"
        base = os.path.join(s.cfg.dir, f"{s.prefix}-{os.getpid()}-{stamp}")
        path = base + suffix
        n = 1
        while os.path.exists(path):  # two files within a microsecond (rotation by size)
            path = f"{base}-{n}{suffix}"
            n += 1
        f = _File(path, s.cfg.gzip)
        s.stats["files"] += 1
        return f

    def _close(self, s: _Sink) -> None:
        f = s.file
        if f is None:
            return
        try:
            self._count(s, "written", f.end_block())
        except OSError as err:
            self._failed(s, err, 0)
            return
        s.file = None
        f.close()

    def _failed(self, s: _Sink, err: OSError, extra: int) -> None:
        """A write failed: the open block is lost, the file is closed, retried later."""
        f = s.file
        lost = extra
        if f is not None:
            lost += f.abort_block()
            f.close()
            s.file = None
        s.retry_at = time.monotonic() + RETRY_AFTER
        self._count(s, "error", lost)
        self._log(s, f"write failed, {lost} record(s) lost: {err}")

    def _count(self, s: _Sink, outcome: str, n: int) -> None:
        if n <= 0:
            return
        s.stats[outcome] += n
        if self.metrics is not None:
            self.metrics.record_written(s.recorder.route, s.recorder.target, outcome, n)

    def _log(self, s: _Sink, message: str) -> None:
        now = time.monotonic()
        if now - s.last_error_log < ERROR_LOG_INTERVAL:
            s.suppressed += 1
            return
        more = f" ({s.suppressed} more since the last report)" if s.suppressed else ""
        s.suppressed = 0
        s.last_error_log = now
        log.warning("recording %s in %s: %s%s", s.prefix, s.cfg.dir, message, more)

    # ----- for status pages and tests -----
    def stats(self) -> dict[tuple[str, str], dict[str, int]]:
        out: dict[tuple[str, str], dict[str, int]] = {}
        for s in self._sinks:
            d = out.setdefault(s.label, {"written": 0, "error": 0, "files": 0})
            for k, v in s.stats.items():
                d[k] += v
        return out
