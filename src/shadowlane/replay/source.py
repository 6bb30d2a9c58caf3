"""What a replay sends, in which order: recorded requests selected, parsed and joined.

From the recordings (files, or directories of them, several instances merged by time):
  1. requests (type 1) whose timestamp is in the window `[from, until)`, in timestamp order;
  2. parsed with a real HTTP parser (`messages`); records that are not whole requests and
     protocol switches are counted and skipped, never guessed at;
  3. kept if they pass the filters (methods, path regex, headers);
  4. joined with their recorded answer (type 2, same id) when the replay needs it (comparing
     with it, or building a write from it), looking ahead a bounded way for it;
  5. for writes built from the primary's answer, put in the order the primary *answered* in
     (start + latency), which is the order live shadowing admits them to their scopes.

Everything is a generator over the files: memory holds the requests waiting for their answer
or their turn, bounded by the look-ahead, never the recording.

Look-ahead: a recorder writes an answer when it ends, after requests that started later, so
the answer to a request is searched for in the records that follow it, up to `ANSWER_WINDOW_NS`
of recorded time past the request's start (a request slower than that has no answer as far as
the replay is concerned) or `MAX_PENDING` requests. The same margin tolerates files that are a
little out of time order near `until`.
"""

from __future__ import annotations

import heapq
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from shadowlane.compare import Captured
from shadowlane.record import REQUEST, RESPONSE, Payload, iter_merged
from shadowlane.replay.messages import Invalid, RecordedRequest, parse_answer, parse_request

#: how far past a request's start (recorded time) its answer is looked for
ANSWER_WINDOW_NS = 60 * 1_000_000_000
#: at most this many requests wait for their answers at once
MAX_PENDING = 10_000


@dataclass(frozen=True, slots=True)
class Filters:
    """Which recorded requests are replayed (all must hold; empty means any)."""

    methods: frozenset[str] = frozenset()
    path: re.Pattern[str] | None = None
    #: (lower-case header name, regex its value must match somewhere)
    headers: tuple[tuple[str, re.Pattern[str]], ...] = ()

    def keep(self, rec: RecordedRequest) -> bool:
        req = rec.request
        if self.methods and req.method not in self.methods:
            return False
        if self.path is not None and self.path.search(req.path) is None:
            return False
        for name, regex in self.headers:
            value = req.header(name)
            if value is None or regex.search(value) is None:
                return False
        return True


class Window:
    """`[from, until)` in epoch nanoseconds, either end open; an offset end (`+30s`) is
    resolved against the first record of the recording when it is read."""

    __slots__ = ("_from", "_until", "from_ns", "until_ns")

    def __init__(self, start: tuple[str, int] | None, end: tuple[str, int] | None) -> None:
        #: ("at", ns) or ("offset", ns)
        self._from = start
        self._until = end
        self.from_ns: int | None = None
        self.until_ns: int | None = None
        self._resolve(None)

    def _resolve(self, first_ns: int | None) -> None:
        def one(spec: tuple[str, int] | None) -> int | None:
            if spec is None:
                return None
            kind, value = spec
            if kind == "at":
                return value
            return None if first_ns is None else first_ns + value

        self.from_ns = one(self._from)
        self.until_ns = one(self._until)

    def fresh(self) -> Window:
        """The same window, offsets not resolved yet (for another pass)."""
        return Window(self._from, self._until)

    def first(self, ts_ns: int) -> None:
        """The recording's first timestamp: offsets count from it."""
        self._resolve(ts_ns)


@dataclass(slots=True, eq=False)
class Item:
    """One request to replay."""

    seq: int
    id: str
    ts_ns: int
    rec: RecordedRequest
    #: the recorded answer, when joined
    answer: Captured | None = None
    #: when the primary answered (start + latency): the write order
    answered_ns: int = 0
    #: the answer was looked for and not found
    unanswered: bool = False


@dataclass(slots=True)
class Counts:
    """What the source skipped, and why (each request once)."""

    #: request records read (before the window)
    read: int = 0
    window: int = 0
    invalid: int = 0
    upgrade: int = 0
    filtered: int = 0
    #: answer records that joined a request
    answers: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    invalid_examples: list[str] = field(default_factory=list)


class Source:
    """The items of one pass over the recordings (a `--loop` makes a new one per pass)."""

    def __init__(
        self,
        files: Sequence[str],
        window: Window,
        filters: Filters,
        *,
        answers: bool,
        answer_limit: int,
        by_answer_time: bool,
        counts: Counts | None = None,
    ) -> None:
        self.files = list(files)
        self.window = window
        self.filters = filters
        #: join recorded answers
        self.answers = answers
        self.answer_limit = answer_limit
        self.by_answer_time = by_answer_time and answers
        self.counts = counts if counts is not None else Counts()
        #: the timestamp of the last request record read, selected or not
        self.last_read_ns = 0

    def __iter__(self) -> Iterator[Item]:
        items = self._joined(iter_merged(self.files))
        return self._answer_order(items) if self.by_answer_time else items

    def _selected(self, payloads: Iterable[Payload]) -> Iterator[Payload | Item]:
        """Requests in the window, parsed and filtered, as Items; answers passed through."""
        counts = self.counts
        window = self.window
        first = True
        seq = 0
        for p in payloads:
            if first:
                window.first(p.ts_ns)
                first = False
            if p.kind == RESPONSE:
                yield p
                continue
            if p.kind != REQUEST:
                continue
            counts.read += 1
            self.last_read_ns = p.ts_ns
            lo, hi = window.from_ns, window.until_ns
            if (lo is not None and p.ts_ns < lo) or (hi is not None and p.ts_ns >= hi):
                counts.window += 1
                if hi is not None and p.ts_ns >= hi + ANSWER_WINDOW_NS:
                    return  # past the window, by more than records are ever out of order
                continue
            try:
                rec = parse_request(p.data)
            except Invalid as exc:
                counts.invalid += 1
                if len(counts.invalid_examples) < 5:
                    counts.invalid_examples.append(f"record {p.id}: {exc}")
                continue
            if rec.upgrade:
                counts.upgrade += 1
                continue
            if not self.filters.keep(rec):
                counts.filtered += 1
                continue
            if counts.first_ns is None:
                counts.first_ns = p.ts_ns
            counts.last_ns = p.ts_ns
            yield Item(seq, p.id, p.ts_ns, rec, answered_ns=p.ts_ns)
            seq += 1

    def _joined(self, payloads: Iterable[Payload]) -> Iterator[Item]:
        """Items in start order, each with its recorded answer when one is asked for."""
        if not self.answers:
            for x in self._selected(payloads):
                if isinstance(x, Item):
                    yield x
            return
        pending: deque[Item] = deque()
        #: id -> the requests of that id still without an answer, oldest first
        waiting: dict[str, deque[Item]] = {}
        limit = self.answer_limit
        for x in self._selected(payloads):
            if isinstance(x, Item):
                pending.append(x)
                waiting.setdefault(x.id, deque()).append(x)
            else:
                same = waiting.get(x.id)
                if same:
                    item = same.popleft()
                    if not same:
                        del waiting[x.id]
                    try:
                        item.answer = parse_answer(
                            x.data, item.rec.request.method, x.latency_ns / 1e9, limit
                        )
                        item.answered_ns = item.ts_ns + max(0, x.latency_ns)
                        self.counts.answers += 1
                    except Invalid:
                        item.unanswered = True
            # the oldest request goes once answered, or once its answer is past hope
            while pending:
                head = pending[0]
                if (
                    head.answer is None
                    and not head.unanswered
                    and self.last_read_ns < head.ts_ns + ANSWER_WINDOW_NS
                    and len(pending) <= MAX_PENDING
                ):
                    break
                pending.popleft()
                yield self._done(head, waiting)
        while pending:
            yield self._done(pending.popleft(), waiting)

    @staticmethod
    def _done(item: Item, waiting: dict[str, deque[Item]]) -> Item:
        if item.answer is None:
            item.unanswered = True
            same = waiting.get(item.id)
            if same and item in same:
                same.remove(item)
                if not same:
                    del waiting[item.id]
        return item

    @staticmethod
    def _answer_order(items: Iterator[Item]) -> Iterator[Item]:
        """Items by the time their primary answered: an item goes once a request that started
        later than that time has been read (no later one can have answered before it)."""
        heap: list[tuple[int, int, Item]] = []
        for item in items:
            heapq.heappush(heap, (item.answered_ns, item.seq, item))
            while heap and heap[0][0] <= item.ts_ns:
                yield heapq.heappop(heap)[2]
        while heap:
            yield heapq.heappop(heap)[2]
