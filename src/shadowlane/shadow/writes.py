"""Writes that converge: what one ordered (or id-rewriting) shadow does around each copy.

Between the primary's answer and the copy's end, a write copy goes through three steps the
plain pipeline does not have:
  1. `prepare`: build the copy from the request *and the primary's answer*: ids the primary
     generated are given to the copy (`ids_from_primary`), a copy the primary's answer says
     must not exist is not sent, and one whose answer cannot be used is not guessed at;
  2. its key set, for the ordering scope (`shadow/keys.py`, `shadow/ordering.py`);
  3. `finished`: when the copy ends, everything that may have left the target unlike the
     primary goes to the divergence ledger with the keys now suspect.

The Elasticsearch/OpenSearch knowledge is in `shadow/elasticsearch.py`; this module is what any
such knowledge plugs into, and it takes plain values (method, target, body, the primary's
`Captured` answer), not the live exchange, so `shadowlane replay` can put recorded writes
through the same steps and the same scopes.

Nothing here blocks: the ledger record is handed to the comparator's thread, which stores it.
A `_bulk` of `OFFLOAD_AT` bytes or more (body and primary answer) is not prepared or checked on
the event loop at all: `prepare_es` and `check_es` are plain functions of bytes, and the write
worker (`shadow/offload.py`, a child process) runs them for it; the ticket keeps the copies of
its ordering scope in order meanwhile (`ordering.BuildLine`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from shadowlane.compare.diff import decoded_body
from shadowlane.compare.model import Captured
from shadowlane.config import ShadowConfig
from shadowlane.shadow.elasticsearch import (
    Divergent,
    EsRequest,
    IdsSkip,
    IdsUnusable,
    parse_request,
)
from shadowlane.shadow.join import CompareSlot, captured
from shadowlane.shadow.keys import SCOPE_BARRIER, KeysFn, OrderKeys, key_extractor
from shadowlane.shadow.outcomes import (
    CIRCUIT_OPEN,
    COPY_DROPPED,
    DIV_ANSWER_UNUSABLE,
    DIV_DROPPED,
    DIV_ERROR,
    DIV_STATUS,
    DIV_TIMEOUT,
    DIVERGENCE_REASONS,
    ERROR,
    OK,
    TIMEOUT,
    CopyEnd,
    DivergenceReason,
)
from shadowlane.store.ledger import Divergence
from shadowlane.wire.messages import Body, Request

if TYPE_CHECKING:
    from shadowlane.metrics import Metrics
    from shadowlane.shadow.lane import ShadowCopy, ShadowResult

#: how much of an answer a write check keeps (the primary's, for ids and `_bulk` items, and
#: the target's): a `_bulk` answer is ~150 bytes an item, so this covers ~25,000 items
ANSWER_LIMIT = 4 * 1024 * 1024
#: a `_bulk` copy whose body and primary answer together reach this many bytes is prepared and
#: checked by the write worker, off the loop: parsing, rewriting and checking one costs 5-7 us
#: a document on the loop (measured, compiled: a 1 MiB bulk of 100-byte documents is ~50 ms),
#: so this bounds what one copy can stall the loop for to ~2 ms
OFFLOAD_AT = 64 * 1024

Record = Callable[[Divergence], bool]


class OffLoop(Protocol):
    """What builds big copies and checks their ends off the loop (`offload.WriteWorker`; a
    protocol, so this module, which the worker's child runs too, does not import it)."""

    def prepare(
        self,
        ids: bool,
        barrier: bool,
        method: str,
        target: bytes,
        body: Body,
        status: int,
        answer: Captured | None,
        done: Callable[[Prepared | Unsent | None], None],
    ) -> str: ...

    def end(
        self,
        job: int,
        reason: str,
        detail: str,
        status: int,
        answer: Captured | None,
        found: Callable[[list[Divergent] | None], None],
    ) -> bool: ...


def _reason(name: str) -> DivergenceReason:
    """A reason the Elasticsearch checks name, as the ledger's vocabulary."""
    for r in DIVERGENCE_REASONS:
        if r == name:
            return r
    return DIV_ANSWER_UNUSABLE


def _ok(status: int) -> bool:
    return 200 <= status < 300


class Prepared:
    """One write copy as it will be sent, and what its end is checked against."""

    __slots__ = (
        "body",
        "es",
        "held",
        "job",
        "keys",
        "method",
        "primary_answer",
        "primary_status",
        "primary_truncated",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        body: bytes,
        keys: OrderKeys,
        es: EsRequest | None,
        primary_status: int,
        primary_answer: bytes = b"",
        primary_truncated: bool = False,
    ) -> None:
        self.method = method
        #: path and query before the shadow's own rewrite_path
        self.target = target
        self.body = body
        self.keys = keys
        self.es = es
        self.primary_status = primary_status
        #: kept only when the end needs it (a `_bulk` is checked item by item)
        self.primary_answer = primary_answer
        self.primary_truncated = primary_truncated
        #: the write worker holds what the end is checked against under this id (0: here),
        #: `held` bytes of it (the primary's answer)
        self.job = 0
        self.held = 0

    @property
    def kept(self) -> int:
        """Bytes held for the end's check, here or by the write worker (counted against the
        lane's byte bound: the worker's memory is the proxy's too)."""
        return len(self.primary_answer) + self.held


class Unsent:
    """No copy: the primary's answer says there is nothing to copy (`divergent` False), or
    cannot be used to build the copy (`divergent` True: the ledger hears of it)."""

    __slots__ = ("divergent", "keys", "reason")

    def __init__(self, reason: str, keys: OrderKeys, divergent: bool) -> None:
        self.reason = reason
        self.keys = keys
        self.divergent = divergent


class WritePlan:
    """The write steps of one shadow (one per lane that orders or rewrites ids)."""

    __slots__ = (
        "_keys",
        "_metrics",
        "_record",
        "barrier",
        "es",
        "ids",
        "route",
        "scope",
        "target",
        "worker",
    )

    def __init__(
        self,
        cfg: ShadowConfig,
        route: str,
        scope: str,
        metrics: Metrics,
        record: Record | None,
    ) -> None:
        order = cfg.ordering
        self.route = route
        self.target = cfg.backend
        self.scope = scope
        self._metrics = metrics
        self._record = record
        self.barrier = order is not None and order.barrier
        self.ids = cfg.ids_from_primary == "elasticsearch"
        self.es = self.ids or (order is not None and order.keys == "elasticsearch")
        #: prepares and checks the big `_bulk` copies off the loop (`offloads`); None where
        #: everything is done in line (replay, tests of the steps)
        self.worker: OffLoop | None = None
        self._keys: KeysFn | None = None
        if order is not None and isinstance(order.keys, list):
            self._keys = key_extractor(order.keys)

    @property
    def needs_answer(self) -> bool:
        """The primary's answer is read (ids; `_bulk` items are checked against it), and the
        target's too: both are captured for these copies."""
        return self.es

    # ----- before the copy -----
    def prepare(
        self, req: Request, body: bytes, status: int, answer: Captured | None
    ) -> Prepared | Unsent:
        """The copy of `req` (with `body`) whose primary answered `status` (and `answer`,
        when it was captured). Replay builds a `Request` from a recording and calls this too."""
        if not self.es:
            return Prepared(req.method, req.target, body, self._generic(req, body), None, status)
        return prepare_es(self.ids, self.barrier, req.method, req.target, body, status, answer)

    def offloads(self, req: Request, size: int, answer: Captured | None) -> bool:
        """Is this copy's preparation (and later its check) big enough to leave the loop? Only
        `_bulk` bodies are: everything else is one document, microseconds of work."""
        if not self.es or b"_bulk" not in req.target:
            return False
        return size + (len(answer.body) if answer is not None else 0) >= OFFLOAD_AT

    def _generic(self, req: Request, body: bytes) -> OrderKeys:
        if self.barrier or self._keys is None:
            return SCOPE_BARRIER
        return self._keys(req, body)

    def unsent_keys(self, req: Request, body: bytes | None) -> OrderKeys:
        """The keys of a copy that will not be built (its body is missing or too big, the
        client left): what the ledger marks suspect. Without its body a `_bulk` may have
        touched any index (each action can name its own), so its key is the whole scope."""
        if self.barrier:
            return SCOPE_BARRIER
        if self.es:
            if body is None and b"_bulk" in req.target:
                return SCOPE_BARRIER
            return parse_request(req.method, req.target, body or b"").order_keys()
        return self._generic(req, body or b"")

    # ----- after the copy -----
    def finished(
        self,
        prep: Prepared,
        end: CopyEnd,
        status: int,
        answer: Captured | None,
        request_id: str,
        uri: str,
    ) -> None:
        """The copy ended: record whatever may have left the target unlike the primary."""
        reason: DivergenceReason | None = None
        detail = ""
        if end in (ERROR, TIMEOUT):
            reason, detail = (DIV_ERROR if end == ERROR else DIV_TIMEOUT), "no answer"
        elif end in (CIRCUIT_OPEN, COPY_DROPPED):
            reason = DIV_DROPPED
            detail = "circuit open" if end == CIRCUIT_OPEN else "dropped at drain"
        elif end != OK:
            return
        if prep.job:
            self.ended_there(prep, reason, detail, status, answer, request_id, uri)
        elif reason is None:
            self.found(prep, check_es(prep, status, answer), request_id, uri)
        else:
            self.diverged(prep.keys, reason, request_id, prep.method, uri, detail)

    def ended_there(
        self,
        prep: Prepared,
        reason: DivergenceReason | None,
        detail: str,
        status: int,
        answer: Captured | None,
        request_id: str,
        uri: str,
    ) -> None:
        """The end of a copy the write worker built: it checks the answer (`reason` None) or
        names the copy's documents with `reason`; what it finds goes to the ledger here."""
        worker = self.worker
        if worker is None or not worker.end(
            prep.job,
            reason or "",
            detail,
            status,
            answer,
            lambda found: self.found(prep, found, request_id, uri),
        ):
            self.found(prep, None, request_id, uri)

    def found(
        self, prep: Prepared, found: list[Divergent] | None, request_id: str, uri: str
    ) -> None:
        """Write what a check found to the ledger, one entry per reason. None: the check was
        lost with the write worker: the whole scope is marked suspect (the keys of a copy the
        worker built are `OrderKeys(scope=True)`, see `WriteWorker._built`: its documents were
        known only there)."""
        if found is None:
            lost = "the write worker was lost before the copy's end was checked"
            self.diverged(prep.keys, DIV_ANSWER_UNUSABLE, request_id, prep.method, uri, lost)
            return
        if not found:
            return
        by_reason: dict[DivergenceReason, tuple[list[str], list[str]]] = {}
        for d in found:
            labels, details = by_reason.setdefault(_reason(d.reason), ([], []))
            labels.append(d.label)
            if d.detail and len(details) < 5:
                details.append(d.detail)
        for reason, (labels, details) in by_reason.items():
            self._write(
                tuple(dict.fromkeys(labels)),
                reason,
                request_id,
                prep.method,
                uri,
                "; ".join(details),
            )

    def diverged(
        self,
        keys: OrderKeys,
        reason: DivergenceReason,
        request_id: str,
        method: str,
        uri: str,
        detail: str = "",
    ) -> None:
        labels = keys.labels()
        if not labels:
            return  # a read: nothing of the target's state depends on it
        self._write(tuple(labels), reason, request_id, method, uri, detail)

    def _write(
        self,
        labels: tuple[str, ...],
        reason: DivergenceReason,
        request_id: str,
        method: str,
        uri: str,
        detail: str,
    ) -> None:
        self._metrics.divergence(self.route, self.target, reason)
        if self._record is not None:
            self._record(
                Divergence(
                    ts=time.time(),
                    route=self.route,
                    target=self.target,
                    scope=self.scope,
                    reason=reason,
                    keys=labels,
                    request_id=request_id,
                    method=method,
                    uri=uri,
                    detail=detail,
                )
            )


def prepare_es(
    ids: bool,
    barrier: bool,
    method: str,
    target: bytes,
    body: bytes,
    status: int,
    answer: Captured | None,
) -> Prepared | Unsent:
    """An Elasticsearch copy as `WritePlan.prepare` builds it (`ids`: ids from the primary;
    `barrier`: the copy is a scope barrier): a function of bytes, so the write worker can run
    it too."""
    es = parse_request(method, target, body)
    if answer is None:
        primary, truncated = b"", True
    else:
        primary, truncated = decoded_body(answer, ANSWER_LIMIT)
    if ids and es.generated_ids():
        if answer is None:
            return Unsent("the primary's answer was not captured", es.order_keys(), True)
        rewritten = es.with_primary_ids(status, primary, truncated)
        if isinstance(rewritten, IdsSkip):
            return Unsent(rewritten.reason, es.order_keys(), False)
        if isinstance(rewritten, IdsUnusable):
            return Unsent(rewritten.reason, es.order_keys(), True)
        es = rewritten
    keys = SCOPE_BARRIER if barrier else es.order_keys()
    bulk = b"_bulk" in es.target
    return Prepared(
        es.method, es.target, es.body(), keys, es, status, primary if bulk else b"", truncated
    )


def check_es(prep: Prepared, status: int, answer: Captured | None) -> list[Divergent]:
    """What may differ after the target answered `prep` with `status` (and `answer`)."""
    es = prep.es
    if es is None:
        if _ok(status) == _ok(prep.primary_status):
            return []
        detail = f"primary {prep.primary_status}, shadow {status}"
        return [Divergent(label, DIV_STATUS, detail) for label in prep.keys.labels()]
    body, truncated = (b"", True) if answer is None else decoded_body(answer, ANSWER_LIMIT)
    return es.divergences(
        prep.primary_status, prep.primary_answer, prep.primary_truncated,
        status, body, truncated,
    )  # fmt: skip


class WriteEnd:
    """The end of one write copy: its check, then the comparison slot's callback if any."""

    __slots__ = ("_plan", "_prep", "_request_id", "_slot", "_uri")

    def __init__(
        self, plan: WritePlan, prep: Prepared, request_id: str, uri: str, slot: CompareSlot | None
    ) -> None:
        self._plan = plan
        self._prep = prep
        self._request_id = request_id
        self._uri = uri
        self._slot = slot

    def on_done(self, copy: ShadowCopy, result: ShadowResult) -> None:
        end = result.outcome
        answer = captured(result) if end == OK else None
        self._plan.finished(self._prep, end, result.status, answer, self._request_id, self._uri)
        self._prep.primary_answer = b""  # checked: nothing more to keep
        if self._slot is not None:
            self._slot.on_candidate(copy, result)
