"""The event loop's half of a recording: sample, bound, and hand over; never wait, never encode.

One `Recorder` per recorded route (or shadow) and generation. The proxy (or the shadow ticket)
calls it once per request with what it already holds: the request head it serialised for the
upstream (the primary's, or the copy's), the body bytes it retained anyway, and, with `answers`,
the answer it captured. Nothing is serialised, redacted, encoded or compressed here: that is
the writer thread's work
(record/writer.py). What the loop pays is a few comparisons, one small object and a deque
append; `deque.append` and `popleft` are atomic under the GIL, so the two threads share no lock
and the writer is never woken per record (it polls, as the comparator does).

Bounded by bytes: a record counts the body and answer bytes it pins. `queued` only grows on the
loop and `done` only on the writer, so each is written by one thread; their difference is what
is pending. A record that would take the pending bytes past `queue_limit` is dropped and counted
(`dropped`), never waited for: a slow or full disk costs records, not requests.

Compiled (setup.py): the proxy calls into it per request.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from shadowlane.compare.model import Captured
from shadowlane.wire.headers import reason_phrase
from shadowlane.wire.messages import Request

if TYPE_CHECKING:
    from shadowlane.metrics import Metrics

#: decides per request whether it is recorded (a shadow `Sampler`'s bound `sampled`)
SampleFn = Callable[[Request], bool]

#: GoReplay's payload separator (record/goreplay.py SEPARATOR; repeated here so that this
#: compiled module imports nothing interpreted on the writer's fast path)
SEPARATOR: Final = "\n🐵🙈🙉\n".encode()

#: what a record costs beside its bodies: the head, the item, the deque slot (a guess that
#: keeps a flood of bodiless requests bounded too)
RECORD_OVERHEAD: Final = 512


class RecordItem:
    """One request (and maybe its answer) waiting for the writer."""

    __slots__ = ("answer", "body", "head", "latency_ns", "reframe", "request_id", "size", "ts_ns")

    def __init__(
        self,
        head: bytes,
        body: bytes,
        answer: Captured | None,
        request_id: str,
        ts_ns: int,
        size: int,
        latency_ns: int = 0,
        reframe: bool = False,
    ) -> None:
        #: the request head as it was sent upstream (to the primary, or to the shadow for a
        #: copy): serialised once already for the wire, so the writer only copies it
        self.head = head
        self.body = body
        #: the head ends with the proxy's `transfer-encoding: chunked` line (the client sent
        #: a chunked body); the record carries the de-chunked body, framed by Content-Length
        self.reframe = reframe
        #: the answer (status, headers, body up to max_body, seconds from the request's start);
        #: None when answers are not recorded, or there was none
        self.answer = answer
        self.request_id = request_id
        #: when the request started, nanoseconds since the epoch
        self.ts_ns = ts_ns
        #: the bytes this item counts against the queue
        self.size = size
        #: from the request's start to the end of its answer (wall clock: the loop's clock
        #: has millisecond steps under uvloop)
        self.latency_ns = latency_ns


class Recorder:
    """One recording of one route (target "") or of one shadow of a route."""

    __slots__ = (
        "answers",
        "closed",
        "done",
        "items",
        "max_body",
        "metrics",
        "queue_limit",
        "queued",
        "route",
        "sampled",
        "target",
    )

    def __init__(
        self,
        route: str,
        target: str,
        *,
        max_body: int,
        queue_limit: int,
        answers: bool,
        metrics: Metrics,
        sampled: SampleFn | None = None,
    ) -> None:
        self.route = route
        self.target = target
        self.max_body = max_body
        self.queue_limit = queue_limit
        self.answers = answers
        self.metrics = metrics
        #: None records every request (percent 100): no call per request
        self.sampled = sampled
        #: the writer takes from the left; only the loop appends
        self.items: deque[RecordItem] = deque()
        #: bytes handed over (loop only) / bytes the writer is done with (writer only)
        self.queued = 0
        self.done = 0
        #: the generation was replaced: nothing more is taken
        self.closed = False

    @property
    def pending(self) -> int:
        """Bytes waiting for the writer (the `shadowlane_record_pending_bytes` gauge)."""
        return self.queued - self.done

    def wants(self, req: Request) -> bool:
        """Is this request recorded? Counted `sampled_out` when not."""
        sampled = self.sampled
        if sampled is None or sampled(req):
            return True
        self.metrics.record_outcome(self.route, self.target, "sampled_out")
        return False

    def request(
        self,
        head: bytes,
        request_id: str,
        ts_ns: int,
        body: bytes | None,
        answer: Captured | None,
        latency_ns: int = 0,
        reframe: bool = False,
    ) -> None:
        """The client's request is over. `head` is what the primary was sent (the proxy
        serialised it for the wire: recording it costs a reference, not a second
        serialisation), `body` the whole body (None when it was not kept whole), and, with
        `answers`, the primary's answer (None when there was none). `reframe`: the head
        frames a chunked body (see `RecordItem.reframe`)."""
        if body is None or len(body) > self.max_body:
            self.metrics.record_outcome(self.route, self.target, "skipped_body")
            return
        self._take(head, body, request_id, ts_ns, answer, latency_ns, reframe)

    def copy(
        self,
        head: bytes,
        body: bytes,
        request_id: str,
        ts_ns: int,
        answer: Captured | None,
        latency_ns: int = 0,
    ) -> None:
        """A shadow copy as it was sent (`head` serialised, Content-Length framed) and, with
        `answers`, the shadow's answer."""
        if len(body) > self.max_body:
            self.metrics.record_outcome(self.route, self.target, "skipped_body")
            return
        self._take(head, body, request_id, ts_ns, answer, latency_ns, False)

    def _take(
        self,
        head: bytes,
        body: bytes,
        request_id: str,
        ts_ns: int,
        answer: Captured | None,
        latency_ns: int,
        reframe: bool,
    ) -> None:
        size = RECORD_OVERHEAD + len(head) + len(body)
        if answer is not None:
            if answer.failure:
                answer = None  # no answer came: the request alone is recorded
            else:
                size += len(answer.body)
        if self.closed or self.queued + size - self.done > self.queue_limit:
            self.metrics.record_outcome(self.route, self.target, "dropped")
            return
        self.queued += size
        self.items.append(
            RecordItem(head, body, answer, request_id, ts_ns, size, latency_ns, reframe)
        )


def payload_id(request_id: str) -> str:
    """GoReplay's 24 hex digits, derived from the request's X-Request-Id, so a recorded
    request can be found from its access-log line.

    An id in UUID form (shadowlane's own, and most generators') gives its first 12 and last
    12 hex digits as they are (for shadowlane's ids: the process's random prefix and the
    request counter; for a v4 UUID: 96 random bits). A hash per record cost the writer about
    2,000 instructions, a tenth of what recording cost. Any other id is hashed (blake2b, 12
    bytes), so a client's id can never put a space or a newline into the header line."""
    return _payload_id(request_id).decode()


def _payload_id(rid: str) -> bytes:
    if len(rid) == 36 and rid[8] == "-" and rid[13] == "-" and rid[23] == "-":
        pid = (rid[:8] + rid[9:13] + rid[24:]).encode("utf-8", "surrogateescape")
        if len(pid) == 24 and pid.isalnum():
            return pid
    raw = rid.encode("utf-8", "surrogateescape")
    return hashlib.blake2b(raw, digest_size=12).hexdigest().encode()


class Unencodable(ValueError):
    """A message holding GoReplay's payload separator: neither tool could read it back."""


#: the framing line the proxy adds to the head of a chunked request (proxy.py)
CHUNKED_TAIL: Final = b"transfer-encoding: chunked\r\n\r\n"


def encode_item(item: RecordItem) -> bytes:
    """The GoReplay payloads of one record without redaction: the request (type 1) and, when
    there is one, its answer (type 2), separators included."""
    parts: list[bytes] = []
    encode_into(item, parts)
    return b"".join(parts)


def encode_into(item: RecordItem, parts: list[bytes]) -> None:
    """`encode_item`, appended to `parts` (the writer joins a whole slice once).

    Compiled, and it copies the head the proxy already serialised rather than serialising
    the request again: it runs on the writer's thread for every record, and every instruction
    here is one the proxy's cores do not spend on requests. Raises `Unencodable` before it
    appends anything."""
    body = item.body
    # find, not `in`: bytes.__contains__ first tries the operand as an int and pays for the
    # TypeError it raises and clears (about 2,000 instructions, measured), on every record
    if body and body.find(SEPARATOR) >= 0:
        raise Unencodable("request body contains the payload separator")
    ans = item.answer
    if ans is not None and ans.body and ans.body.find(SEPARATOR) >= 0:
        raise Unencodable("answer body contains the payload separator")
    pid = _payload_id(item.request_id)
    ts = str(item.ts_ns).encode()
    parts.append(b"1 " + pid + b" " + ts + b" 0\n")
    head = item.head
    if item.reframe and head.endswith(CHUNKED_TAIL):
        parts.append(head[: len(head) - len(CHUNKED_TAIL)])
        parts.append(b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
    else:
        parts.append(head)
    parts.append(body)
    parts.append(SEPARATOR)
    if ans is None:
        return
    latency = item.latency_ns or int(ans.seconds * 1e9)
    parts.append(b"2 " + pid + b" " + ts + b" " + str(latency).encode() + b"\n")
    status = ans.status
    parts.append(b"HTTP/1.1 " + str(status).encode() + b" " + reason_phrase(status) + b"\r\n")
    if head.startswith(b"HEAD ") or status < 200 or status == 204 or status == 304:
        for name, value in ans.headers:
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        parts.append(b"\r\n")
        parts.append(SEPARATOR)
        return
    abody = ans.body
    for name, value in ans.headers:
        if name == b"content-length" or name == b"transfer-encoding":
            continue
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    if ans.truncated:
        parts.append(b"x-shadowlane-truncated: 1\r\n")
    parts.append(b"content-length: " + str(len(abody)).encode() + b"\r\n\r\n")
    parts.append(abody)
    parts.append(SEPARATOR)


class Slice:
    """Records taken from a recorder and encoded together (the writer's fast path)."""

    __slots__ = ("count", "data", "errors", "first_ts", "max_ts", "min_ts", "size")

    def __init__(self) -> None:
        #: the records' GoReplay payloads, joined
        self.data = b""
        #: records encoded, and records that could not be (holding the separator)
        self.count = 0
        self.errors = 0
        #: the queue bytes of every record taken (written or not)
        self.size = 0
        self.first_ts = 0
        self.min_ts = 0
        self.max_ts = 0


def take_encoded(rec: Recorder, n: int) -> Slice:
    """Take up to `n` records from `rec` (writer's thread) and encode them without redaction.

    The writer's per-record loop, compiled, with one join for the whole slice: popping,
    encoding and the block's timestamps cost the GIL for about a microsecond a record instead
    of several interpreted ones."""
    out = Slice()
    items = rec.items
    parts: list[bytes] = []
    while n > 0 and items:
        n -= 1
        item = items.popleft()
        out.size += item.size
        try:
            encode_into(item, parts)
        except Unencodable:
            out.errors += 1
            continue
        ts = item.ts_ns
        if out.count == 0:
            out.first_ts = out.min_ts = out.max_ts = ts
        elif ts < out.min_ts:
            out.min_ts = ts
        elif ts > out.max_ts:
            out.max_ts = ts
        out.count += 1
    out.data = b"".join(parts)
    return out
