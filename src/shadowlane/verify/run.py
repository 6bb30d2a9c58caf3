"""The walk: every selected document of both clusters, compared, and optionally repaired.

Paging strategy (why two):

- **merge** (tried first): both sides are read in `_id` order with `search_after`, one pass
  each, and merge-joined like two sorted files: an id on one side only is seen the moment the
  other side's stream passes it. Two requests per page pair, nothing but the two current pages
  in memory. It needs two things a cluster may refuse: sorting on `_id` (Elasticsearch 8
  forbids it unless `indices.id_field_data.enabled`), and an order that agrees with Python's
  string order (Elasticsearch and OpenSearch order `_id` by its encoded bytes, in which numeric
  and base64-looking ids do not sort as strings). So each stream is checked to be strictly
  ascending as it is read; a refused sort, or an id out of order (which also catches one id
  held twice under two routings), switches the index to:
- **lookup** (the fallback; `--strategy lookup` forces it): scroll the primary with
  `_source`, `_mget` the same ids from the shadow, compare; then scroll the shadow ids-only
  (`_source: false`) and `_mget` those ids from the primary ids-only to find the documents only
  the shadow holds. Order-free and works on every version, at about twice the requests (each
  shadow document is read twice, the second time without its source). `_mget` is realtime, so
  it needs no refresh.

Either way memory is bounded by `--batch` (pages, one bulk of repairs), never by an index.
A switch mid-index starts the index again; repairs already made there are kept and counted as
found (see `_Walk.carry`), so the counts do not depend on where the switch happened.

Suspect keys (`--suspects`) read only what the ledger names: single ids by `_mget` from both
sides in batches, whole indices (and `*`, every selected index) by the walk above.

Repair (`--repair`) writes, batch by batch, the primary's `_source` over every differing or
missing document of the shadow (`_bulk` `index`, with the document's routing) and deletes what
only the shadow holds; then re-reads those documents from both sides. The verdict (and the
exit status) is the state after that re-read; the counts say what was found before. An index
the shadow does not have is not created: its mappings and settings are not verify's to guess.

The clusters are read as they are at that moment; writes arriving during a verify (the proxy
still shadowing) can show as differences that are only in flight. `--suspects` after quiet
traffic, or a second run, tells the two apart.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from shadowlane.verify.compare import SourceComparer
from shadowlane.verify.elasticsearch import Cluster, Doc, SortRefused
from shadowlane.verify.model import (
    Example,
    IndexResult,
    Kind,
    RepairCounts,
    SuspectSummary,
    VerifyError,
    VerifyResult,
)
from shadowlane.verify.suspects import SCOPE_LABEL, Ledger, Suspects, matches, parse_labels

__all__ = ["OrderBroken", "Progress", "VerifyOptions", "ascending", "verify"]

Strategy = Literal["auto", "merge", "lookup"]
#: the kinds of cluster `--kind` accepts (one client speaks to both)
KINDS = ("elasticsearch", "opensearch")
MAX_BATCH = 10_000  # index.max_result_window's default: a bigger page is refused anyway


@dataclass(frozen=True, slots=True)
class VerifyOptions:
    primary: str
    shadow: str
    kind: str = "elasticsearch"
    #: `--index` patterns; empty: every index not starting with `.`
    indices: tuple[str, ...] = ()
    #: `--ignore` field paths inside `_source`
    ignore: tuple[str, ...] = ()
    batch: int = 500
    timeout: float = 30.0
    examples: int = 10
    headers: tuple[tuple[str, str], ...] = ()
    strategy: Strategy = "auto"
    repair: bool = False
    suspects: bool = False
    route: str | None = None
    target: str | None = None
    scope: str | None = None


class Progress(Protocol):
    """Where the walk reports how far it is (the terminal bar, or nothing)."""

    def start(self, total: int) -> None: ...
    def advance(self, docs: int) -> None: ...
    def finish(self) -> None: ...


class _NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, docs: int) -> None:
        pass

    def finish(self) -> None:
        pass


class OrderBroken(Exception):
    """A sorted stream was not strictly ascending in Python's string order."""


def ascending(docs: Iterable[Doc], side: str) -> Iterator[Doc]:
    """`docs`, checked strictly ascending by id as they pass: what the merge-join relies on.

    Strictly, because an id seen twice is one id under two routings (two documents), which a
    merge by id cannot pair.
    """
    last: str | None = None
    for doc in docs:
        if last is not None and doc.id <= last:
            raise OrderBroken(
                f"the {side} sorts _id {last!r} before {doc.id!r} (an order verify cannot "
                "merge by, or one id under two routings)"
            )
        last = doc.id
        yield doc


@dataclass(slots=True)
class _Pending:
    """A repair queued in the current bulk."""

    kind: Kind
    doc: Doc
    example: Example | None


@dataclass(slots=True)
class _Carried:
    """Repairs done in an attempt abandoned mid-index, found equal on the re-read: the next
    attempt sees those documents equal (or gone), so they are added back as found."""

    differing: int = 0
    only_in_primary: int = 0
    only_in_shadow: int = 0
    indexed: int = 0
    deleted: int = 0
    examples: list[Example] = field(default_factory=list)


class _Walk:
    """One index being compared: its counts, its examples, and its queued repairs."""

    def __init__(self, run: _Run, result: IndexResult, *, track_ids: bool = False) -> None:
        self.run = run
        self.result = result
        self.repair = run.options.repair
        if self.repair:
            result.repair = RepairCounts()
        self.pending: list[_Pending] = []
        #: examples recorded by this attempt (dropped if it is abandoned)
        self.examples: list[Example] = []
        self.fixed = _Carried()
        #: with `track_ids`: ids that are not equal at the end (suspect ids, already in memory)
        self.unequal: set[str] | None = set() if track_ids else None
        self._warned_missing = False

    def pair(self, p: Doc | None, s: Doc | None) -> None:
        kind: Kind | None
        fields: list[str] = []
        if p is not None and s is not None:
            fields = self.run.comparer.fields(p.source, s.source)
            kind = "differing" if fields else None
        elif p is not None:
            kind = "only_in_primary"
        elif s is not None:
            kind = "only_in_shadow"
        else:
            kind = None  # a suspect id neither side holds: they agree
        self.result.count(kind)
        if kind is None:
            return
        doc_id = p.id if p is not None else s.id if s is not None else ""
        if self.unequal is not None:
            self.unequal.add(doc_id)
        example = self._example(kind, doc_id, p, s, fields)
        if self.repair:
            self._queue(kind, p, s, example)

    def _example(
        self, kind: Kind, doc_id: str, p: Doc | None, s: Doc | None, fields: list[str]
    ) -> Example | None:
        if not self.run.take_example():
            return None
        example = Example(self.result.name, doc_id, kind, fields)
        if p is not None and s is not None:
            example.values = self.run.comparer.values(p.source, s.source, fields)
        self.examples.append(example)
        self.run.result.examples.append(example)
        return example

    def _queue(self, kind: Kind, p: Doc | None, s: Doc | None, example: Example | None) -> None:
        counts = self.result.repair
        assert counts is not None
        if kind == "only_in_shadow":
            assert s is not None
            self.pending.append(_Pending(kind, s, example))
        else:
            assert p is not None
            if self.result.on == "primary" or p.source is None:
                counts.skipped += 1
                if example is not None:
                    example.repaired = False
                if self.result.on == "primary" and not self._warned_missing:
                    self._warned_missing = True
                    self.run.warn(
                        f"{self.result.name}: not on the shadow; --repair does not create "
                        "indices (create it with its mappings and settings, then repair)"
                    )
                return
            self.pending.append(_Pending(kind, p, example))
        if len(self.pending) >= self.run.options.batch:
            self.flush()

    def flush(self) -> None:
        """Send the queued repairs as one bulk, then read them back from both sides."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        counts = self.result.repair
        assert counts is not None
        index = self.result.name
        actions: list[tuple[dict[str, Any], Any]] = []
        for item in pending:
            meta: dict[str, Any] = {"_index": index, "_id": item.doc.id}
            if item.doc.routing is not None:
                meta["routing"] = item.doc.routing
            if item.kind == "only_in_shadow":
                actions.append(({"delete": meta}, None))
            else:
                actions.append(({"index": meta}, item.doc.source))
        failed = self.run.shadow.bulk(actions)
        for reason in list(failed.values())[:3]:
            self.run.warn(f"{index}: repair refused by the shadow: {reason}")
        written = [item for i, item in enumerate(pending) if i not in failed]
        counts.failed += len(failed)
        for i in failed:
            refused = pending[i].example
            if refused is not None:
                refused.repaired = False
        self.run.touched.add(index)
        docs = [item.doc for item in written]
        now_p = self.run.primary.mget(index, docs, source=True)
        now_s = self.run.shadow.mget(index, docs, source=True)
        for item in written:
            if item.kind == "only_in_shadow":
                counts.deleted += 1
            else:
                counts.indexed += 1
            p, s = now_p.get(item.doc.id), now_s.get(item.doc.id)
            ok = (p is None and s is None) or (
                p is not None and s is not None and not self.run.comparer.fields(p.source, s.source)
            )
            if item.example is not None:
                item.example.repaired = ok
            if not ok:
                counts.still_differing += 1
                continue
            if self.unequal is not None:
                self.unequal.discard(item.doc.id)
            setattr(self.fixed, item.kind, getattr(self.fixed, item.kind) + 1)
            if item.kind == "only_in_shadow":
                self.fixed.deleted += 1
            else:
                self.fixed.indexed += 1
            if item.example is not None:
                self.fixed.examples.append(item.example)

    def abandon(self) -> _Carried:
        """Give up this attempt (the index starts again): what it repaired is carried."""
        self.pending = []
        kept = set(map(id, self.fixed.examples))
        for example in self.examples:
            if id(example) not in kept:
                self.run.drop_example(example)
        return self.fixed

    def carry(self, carried: _Carried) -> None:
        """Count an abandoned attempt's repairs as found: this attempt saw those documents
        already equal (copied) or not at all (deleted)."""
        r = self.result
        moved = carried.differing + carried.only_in_primary
        r.equal_docs -= min(moved, r.equal_docs)
        r.differing += carried.differing
        r.only_in_primary += carried.only_in_primary
        r.only_in_shadow += carried.only_in_shadow
        r.compared += carried.only_in_shadow
        if r.repair is not None:
            r.repair.indexed += carried.indexed
            r.repair.deleted += carried.deleted
        self.examples.extend(carried.examples)


class _Run:
    def __init__(
        self, options: VerifyOptions, progress: Progress, warn: Callable[[str], None]
    ) -> None:
        self.options = options
        self.progress = progress
        self._warn = warn
        self.comparer = SourceComparer(options.ignore)
        self.primary = Cluster(
            "primary", options.primary, timeout=options.timeout, headers=options.headers
        )
        self.shadow = Cluster(
            "shadow", options.shadow, timeout=options.timeout, headers=options.headers
        )
        self.result = VerifyResult(self.primary.url, self.shadow.url)
        #: indices written by repairs (refreshed at the end)
        self.touched: set[str] = set()
        #: merge is not tried again once a cluster refused it or its order disagreed
        self.merge_ok = options.strategy != "lookup"

    def warn(self, message: str) -> None:
        self.result.warnings.append(message)
        self._warn(message)

    def take_example(self) -> bool:
        return len(self.result.examples) < self.options.examples

    def drop_example(self, example: Example) -> None:
        self.result.examples = [e for e in self.result.examples if e is not example]

    def close(self) -> None:
        self.primary.close()
        self.shadow.close()

    # -- which indices ------------------------------------------------------------------------

    def select(self) -> list[str]:
        """The indices `--index` selects on either cluster (union), closed ones left out."""
        p, s = self.primary.indices(), self.shadow.indices()
        names = sorted(n for n in set(p) | set(s) if matches(n, self.options.indices))
        out = []
        for name in names:
            closed = [
                side for side, idx in (("primary", p), ("shadow", s)) if idx.get(name) == "close"
            ]
            if closed:
                self.warn(f"{name}: closed on the {' and '.join(closed)}; not verified")
                continue
            out.append(name)
        if not out and self.options.indices:
            raise VerifyError(
                "no open index matches --index "
                + " ".join(self.options.indices)
                + " on either cluster (aliases and data streams are not expanded: name indices)"
            )
        return out

    def sizes(self, names: Sequence[str]) -> dict[str, tuple[int | None, int | None]]:
        """`{index: (primary docs, shadow docs)}`, None where the cluster has no such index."""
        return {n: (self.primary.count(n), self.shadow.count(n)) for n in names}

    # -- one index ----------------------------------------------------------------------------

    def index(self, name: str, size: tuple[int | None, int | None]) -> IndexResult:
        p_has, s_has = size[0] is not None, size[1] is not None
        on = "both" if p_has and s_has else "primary" if p_has else "shadow" if s_has else "neither"
        carried: _Carried | None = None
        if self.merge_ok:
            walk = _Walk(self, IndexResult(name, on, "merge"))
            try:
                self._merge(walk, p_has, s_has)
                walk.flush()
                return walk.result
            except SortRefused as err:
                if self.options.strategy == "merge":
                    raise
                self.warn(f"{err}; comparing by scroll and _mget instead")
                carried = walk.abandon()
            except OrderBroken as err:
                if self.options.strategy == "merge":
                    raise VerifyError(f"{name}: {err}: use --strategy lookup") from None
                self.warn(f"{name}: {err}; comparing by scroll and _mget instead")
                carried = walk.abandon()
            self.merge_ok = False
        walk = _Walk(self, IndexResult(name, on, "lookup"))
        self._lookup(walk, p_has, s_has)
        walk.flush()
        if carried is not None:
            walk.carry(carried)
        return walk.result

    def _sorted(self, cluster: Cluster, index: str, source: bool) -> Iterator[Doc]:
        def docs() -> Iterator[Doc]:
            for page in cluster.sorted_pages(index, self.options.batch, source=source):
                self.progress.advance(len(page))
                yield from page

        return ascending(docs(), cluster.name)

    def _merge(self, walk: _Walk, p_has: bool, s_has: bool) -> None:
        index = walk.result.name
        both = p_has and s_has
        none: Iterator[Doc] = iter(())
        ps = self._sorted(self.primary, index, both) if p_has else none
        ss = self._sorted(self.shadow, index, both) if s_has else none
        try:
            # both first pages before anything is compared: a refused sort costs nothing
            p, s = next(ps, None), next(ss, None)
            while p is not None or s is not None:
                if s is None or (p is not None and p.id < s.id):
                    walk.pair(p, None)
                    p = next(ps, None)
                elif p is None or s.id < p.id:
                    walk.pair(None, s)
                    s = next(ss, None)
                else:
                    walk.pair(p, s)
                    p, s = next(ps, None), next(ss, None)
        finally:
            for gen in (ps, ss):
                close = getattr(gen, "close", None)
                if close is not None:
                    close()

    def _lookup(self, walk: _Walk, p_has: bool, s_has: bool) -> None:
        index, batch = walk.result.name, self.options.batch
        if p_has:
            for page in self.primary.scroll_pages(index, batch, source=s_has):
                self.progress.advance(len(page))
                found = self.shadow.mget(index, page, source=True) if s_has else {}
                for doc in page:
                    walk.pair(doc, found.get(doc.id))
        if s_has:
            for page in self.shadow.scroll_pages(index, batch, source=False):
                self.progress.advance(len(page))
                there = self.primary.mget(index, page, source=False) if p_has else {}
                for doc in page:
                    if doc.id not in there:
                        walk.pair(None, doc)

    def ids(self, index: str, ids: set[str], size: tuple[int | None, int | None]) -> _Walk:
        """Suspect ids of one index (or alias), by `_mget` from both sides."""
        p_has, s_has = size[0] is not None, size[1] is not None
        on = "both" if p_has and s_has else "primary" if p_has else "shadow" if s_has else "neither"
        walk = _Walk(self, IndexResult(index, on, "ids", whole=False), track_ids=True)
        ordered = sorted(ids)
        batch = self.options.batch
        for start in range(0, len(ordered), batch):
            docs = [Doc(i) for i in ordered[start : start + batch]]
            p = self.primary.mget(index, docs, source=True) if p_has else {}
            s = self.shadow.mget(index, docs, source=True) if s_has else {}
            self.progress.advance(2 * len(docs))
            for doc in docs:
                walk.pair(p.get(doc.id), s.get(doc.id))
        walk.flush()
        return walk

    # -- the whole run ------------------------------------------------------------------------

    def everything(self) -> None:
        names = self.select()
        sizes = self.sizes(names)
        self.progress.start(sum((a or 0) + (b or 0) for a, b in sizes.values()))
        for name in names:
            self.result.indices.append(self.index(name, sizes[name]))

    def suspects(self, ledger: Ledger) -> None:
        o = self.options
        try:
            labels = ledger.suspect_keys(route=o.route, target=o.target, scope=o.scope)
        except Exception as err:  # any driver error: one line, exit 2
            raise VerifyError(f"store: cannot read the divergence ledger: {err}") from None
        found = parse_labels(labels, o.indices)
        summary = SuspectSummary(
            labels=len(labels), ignored=found.ignored, unselected=len(found.unselected)
        )
        self.result.suspects = summary
        if found.ignored:
            shown = ", ".join(found.ignored[:5]) + (" ..." if len(found.ignored) > 5 else "")
            self.warn(
                f"{len(found.ignored)} ledger key(s) are not Elasticsearch keys "
                f"(index/id, index or *), left alone: {shown}"
            )
        if found.unselected:
            self.warn(f"{len(found.unselected)} ledger key(s) name indices --index leaves out")
        whole = self.select() if found.scope else []
        whole += sorted(found.indices - set(whole))
        walks: dict[str, _Walk] = {}
        sizes = self.sizes([*whole, *sorted(set(found.ids) - set(whole))])
        total = sum((a or 0) + (b or 0) for n, (a, b) in sizes.items() if n in whole)
        self.progress.start(total + 2 * sum(len(v) for k, v in found.ids.items() if k not in whole))
        for name in whole:
            self.result.indices.append(self.index(name, sizes[name]))
        for name in sorted(set(found.ids) - set(whole)):
            walk = self.ids(name, found.ids[name], sizes[name])
            walks[name] = walk
            self.result.indices.append(walk.result)
        if o.repair:
            self._resolve(ledger, found, walks, summary)

    def _resolve(
        self, ledger: Ledger, found: Suspects, walks: dict[str, _Walk], summary: SuspectSummary
    ) -> None:
        """Mark resolved every label whose documents are now equal on both sides."""
        by_name = {r.name: r for r in self.result.indices}
        done = []
        for label in found.labels:
            if label == SCOPE_LABEL:
                ok = self.result.equal
            else:
                index, slash, doc_id = label.partition("/")
                walk = walks.get(index)
                if slash and walk is not None:
                    ok = walk.unequal is not None and doc_id not in walk.unequal
                else:
                    result = by_name.get(index)
                    ok = result is not None and result.whole and result.equal
            if ok:
                done.append(label)
        if done:
            o = self.options
            try:
                summary.resolved_entries = ledger.resolve_keys(
                    done, route=o.route, target=o.target, scope=o.scope
                )
            except Exception as err:  # the repair is done; say the ledger was not updated
                raise VerifyError(
                    f"store: repaired, but cannot mark the keys resolved in the ledger: {err}"
                ) from None
        summary.resolved_labels = len(done)


def verify(
    options: VerifyOptions,
    *,
    ledger: Ledger | None = None,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Compare (and with `options.repair`, heal) what the two clusters hold.

    Raises `VerifyError` when it cannot run: bad options, a cluster unreachable or answering
    errors, a `--suspects` run without a ledger. `warn` hears each warning as it happens
    (they are also in the result).
    """
    if options.kind not in KINDS:
        raise VerifyError(f"--kind {options.kind!r}: only {' and '.join(KINDS)} are supported")
    if not 1 <= options.batch <= MAX_BATCH:
        raise VerifyError(f"--batch {options.batch}: must be 1..{MAX_BATCH}")
    if options.examples < 0:
        raise VerifyError("--examples: must not be negative")
    if options.timeout <= 0:
        raise VerifyError("--timeout: must be positive")
    if options.suspects and ledger is None:
        raise VerifyError("--suspects needs the store holding the divergence ledger")
    # `--index 'logs-*,-logs-old'`, as Elasticsearch writes index expressions
    patterns = tuple(p.strip() for text in options.indices for p in text.split(",") if p.strip())
    options = dataclasses.replace(options, indices=patterns)
    try:
        run = _Run(options, progress or _NoProgress(), warn or (lambda _m: None))
    except ValueError as err:
        raise VerifyError(str(err)) from None
    started = time.monotonic()
    try:
        if options.suspects:
            assert ledger is not None
            run.suspects(ledger)
        else:
            run.everything()
        if run.touched:
            run.shadow.refresh(run.touched)
    finally:
        run.progress.finish()
        run.close()
    result = run.result
    if options.repair:
        result.repair = RepairCounts()
        for index in result.indices:
            if index.repair is not None:
                result.repair.add(index.repair)
    result.seconds = time.monotonic() - started
    return result
