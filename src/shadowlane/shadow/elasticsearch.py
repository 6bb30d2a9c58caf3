"""Elasticsearch / OpenSearch write requests, as the shadow pipeline needs to understand them.

A migration shadows the writes of the old cluster (the primary) to the new one (the shadow).
Three things about a write decide whether the shadow ends up holding the same documents:

1. **Order.** Two copies that touch the same document must reach the shadow in the order the
   primary applied them; copies of different documents may go in parallel. `order_keys()` says
   what a request touches (`shadow/keys.py`): a document is an item `(index, _id)`; an
   index-level operation (mapping, settings, delete-by-query, ...) is a barrier for its index; a
   cluster-level one (templates, `POST /_aliases`, anything not understood) is a barrier for
   everything. A write whose id the server will choose touches its index without a known item
   (`shared`). Names are taken as written: an alias or a date-math name is its own group, since
   what it resolves to on the server cannot be known here (a write through an alias and one to
   its concrete index are not ordered with each other). An expression that may name several
   indices (`*`, `,`, `_all`, a leading `-` or `+`) is a scope barrier.
2. **Ids.** `POST /{index}/_doc` and `_bulk` index/create actions without `_id` let each server
   invent an id, so the shadow would hold the same documents under other ids.
   `with_primary_ids()` rewrites the copy with the ids the primary's answer reports, and drops
   the bulk actions the primary failed (a copy of those would invent a document the primary
   never stored).
3. **Divergence.** `divergences()` compares the primary's and the shadow's answers (overall
   status, and per `_bulk` item) and names the documents that may now differ.

Runs on the proxy's event loop for every write copy: everything is linear in the body; source
lines of `_bulk` are never parsed (only their boundaries are found) and are passed through
byte for byte; only action lines are parsed, with orjson. Bad input never raises: it gets the
safe answer (a scope barrier; ids unusable), as each function's docstring says.
Plain classes with `__slots__` and `object`-typed JSON values, so mypyc can compile it.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote, unquote_to_bytes

import orjson

from shadowlane.shadow.keys import SCOPE_BARRIER, SCOPE_LABEL, OrderKeys

# the divergence reasons this module gives (the same strings as `shadow.outcomes.DIV_*`; that
# module is not imported so this one stays self-contained)
STATUS_MISMATCH: Final = "status_mismatch"
BULK_ITEM: Final = "bulk_item"
ANSWER_UNUSABLE: Final = "answer_unusable"

#: what a request is, as far as ids and divergences go
_READ: Final = 0  # no state a shadow must match
_DOC: Final = 1  # one document, id known; or an index/cluster operation: keys say which
_DOC_NEW: Final = 2  # POST /{index}/_doc: the server picks the id
_BULK: Final = 3

_NO_KEYS: Final = OrderKeys()

#: `_` endpoints that write no state a shadow must match, whatever the method (a DELETE of a
#: scroll or a point in time frees a cursor; `_refresh`, `_flush`, `_forcemerge` and
#: `_cache/clear` change no document)
_READS: Final = frozenset(
    {
        "_search",  # also _search/scroll, _search/template, _search/point_in_time
        "_msearch",
        "_count",
        "_mget",
        "_refresh",
        "_flush",
        "_forcemerge",
        "_cache",
        "_validate",
        "_explain",
        "_field_caps",
        "_pit",
        "_termvectors",
        "_mtermvectors",
        "_analyze",
        "_rank_eval",
        "_search_shards",
        "_terms_enum",
        "_knn_search",
        "_render",
        "_async_search",
        "_eql",
        "_sql",
        "_mvt",
    }
)
_READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
#: index-level operations whose next segment names a second index (or alias) they create or
#: move: it is barred too, so writes to it wait for the operation
_SECOND_NAME: Final = frozenset({"_alias", "_aliases", "_rollover", "_shrink", "_split", "_clone"})
_BULK_KINDS: Final = frozenset({"index", "create", "update", "delete"})


# --- results -------------------------------------------------------------------------------


class IdsSkip:
    """Nothing to copy: the primary created nothing, so the shadow must not either."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"IdsSkip({self.reason!r})"


class IdsUnusable:
    """The copy needs the primary's ids but its answer cannot give them (cut, not JSON, not
    matching the request): the copy must not be sent, since a guess would invent documents."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        #: a few words for a person
        self.reason = reason

    def __repr__(self) -> str:
        return f"IdsUnusable({self.reason!r})"


class Divergent:
    """One ledger key that may differ between primary and shadow after this copy."""

    __slots__ = ("detail", "label", "reason")

    def __init__(self, label: str, reason: str, detail: str) -> None:
        #: the key as the ledger writes it: `index/id`, `index`, or `*`
        self.label = label
        #: `status_mismatch`, `bulk_item` or `answer_unusable`
        self.reason = reason
        #: the statuses and the failing side's error type, for a person
        self.detail = detail

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Divergent)
            and self.label == other.label
            and self.reason == other.reason
            and self.detail == other.detail
        )

    def __hash__(self) -> int:
        return hash((self.label, self.reason, self.detail))

    def __repr__(self) -> str:
        return f"Divergent({self.label!r}, {self.reason!r}, {self.detail!r})"


class _Action:
    """One `_bulk` action: what it touches and where its lines are in the body."""

    __slots__ = ("id", "index", "kind", "line_end", "line_start", "meta", "plain", "src_end")

    def __init__(
        self,
        kind: str,
        index: str,
        id_: str | None,
        plain: bool,
        meta: dict[str, object] | None,
        line_start: int,
        line_end: int,
        src_end: int,
    ) -> None:
        #: index, create, update or delete
        self.kind = kind
        self.index = index
        #: None: the server chooses it (an index/create without `_id`)
        self.id = id_
        #: `index` is one name, not an expression
        self.plain = plain
        #: the action's metadata object, kept only when `id` is None (it is re-serialised
        #: with the primary's id)
        self.meta = meta
        #: the action line is body[line_start:line_end] (its newline included); its source
        #: line, if any, is body[line_end:src_end]
        self.line_start = line_start
        self.line_end = line_end
        self.src_end = src_end

    def label(self) -> str:
        if not self.plain:
            return SCOPE_LABEL
        if self.id is None:
            return self.index
        return f"{self.index}/{self.id}"


# --- the request ---------------------------------------------------------------------------


class EsRequest:
    """One request as the shadow will send it, with what it touches (see the module docstring).

    Built by `parse_request`, or by `with_primary_ids` for a rewritten copy."""

    __slots__ = (
        "_actions",
        "_body",
        "_bulk_ok",
        "_generated",
        "_index_segment",
        "_keys",
        "_kind",
        "_origin",
        "_primary_count",
        "_problem",
        "_query",
        "method",
        "target",
    )

    def __init__(self, method: str, target: bytes, body: bytes, kind: int, keys: OrderKeys) -> None:
        #: as it will be sent
        self.method = method
        #: path and query as they will be sent
        self.target = target
        self._body = body
        self._kind = kind
        self._keys = keys
        self._generated = False
        # POST /{index}/_doc: the index segment as written and the query, for the rewrite
        self._index_segment = b""
        self._query = b""
        # _bulk: the actions, whether the body was understood (else why not)
        self._actions: list[_Action] = []
        self._bulk_ok = True
        self._problem = ""
        # _bulk rebuilt from the primary's answer: the primary item of each action, and how
        # many items the primary answered; None when the actions are the primary's own
        self._origin: list[int] | None = None
        self._primary_count = 0

    def body(self) -> bytes:
        """The body as it will be sent: the very bytes object parsed when nothing changed."""
        return self._body

    def drop_body(self) -> None:
        """Let go of the body once it was sent: checking the copy's end reads only its actions
        (the write worker holds hundreds of copies until their ends)."""
        self._body = b""

    def order_keys(self) -> OrderKeys:
        """What the copy touches; the scheduler orders copies that share a key."""
        return self._keys

    def generated_ids(self) -> bool:
        """True when the primary chooses an id the shadow must reuse (`with_primary_ids`).

        Also True for a `_bulk` this module could not read unless every action up to the
        line it could not read named its id: not knowing is not a licence to let the shadow
        invent ids."""
        return self._generated

    def with_primary_ids(
        self, status: int, answer: bytes, truncated: bool
    ) -> EsRequest | IdsSkip | IdsUnusable:
        """The copy rewritten with the ids of the primary's answer (`status`, `answer`, and
        whether the answer was cut), or why there is nothing to send. Without generated ids:
        this request itself."""
        if not self._generated:
            return self
        if self._kind == _DOC_NEW:
            return self._doc_with_id(status, answer, truncated)
        return self._bulk_with_ids(status, answer, truncated)

    def _doc_with_id(
        self, status: int, answer: bytes, truncated: bool
    ) -> EsRequest | IdsSkip | IdsUnusable:
        """`POST /{index}/_doc` -> `PUT /{index}/_create/{id}`: create, not index, so a copy
        that meets a document of that id already on the shadow fails (and is reported) rather
        than overwriting it."""
        if not _ok(status):
            return IdsSkip(f"primary answered {status}: it created no document")
        if truncated:
            return IdsUnusable("primary answer cut short")
        doc = _load(answer)
        if not isinstance(doc, dict):
            return IdsUnusable("primary answer is not a JSON object")
        new_id = doc.get("_id")
        if not isinstance(new_id, str) or not new_id:
            return IdsUnusable("primary answer has no _id")
        query = _without_op_type(self._query)
        target = b"/" + self._index_segment + b"/_create/" + quote(new_id, safe="").encode()
        if query:
            target += b"?" + query
        index = _segment(self._index_segment)
        keys = OrderKeys(items=((index, new_id),)) if _plain(index) else SCOPE_BARRIER
        return EsRequest("PUT", target, self._body, _DOC, keys)

    def _bulk_with_ids(
        self, status: int, answer: bytes, truncated: bool
    ) -> EsRequest | IdsSkip | IdsUnusable:
        """Each id-less index/create action gets `_id` from its primary item when that item
        succeeded, and is removed with its source line when it failed. Every other byte of the
        body stays as it was."""
        if not self._bulk_ok:
            return IdsUnusable(f"bulk body not understood: {self._problem}")
        if not _ok(status):
            return IdsUnusable(f"primary answered {status}: its items cannot be trusted")
        if truncated:
            return IdsUnusable("primary answer cut short")
        items = _items(answer)
        if items is None:
            return IdsUnusable("primary answer has no items list")
        actions = self._actions
        if len(items) != len(actions):
            return IdsUnusable(f"primary answered {len(items)} items for {len(actions)} actions")
        body = self._body
        parts: list[bytes] = []
        kept: list[_Action] = []
        origin: list[int] = []
        prev = 0  # the body is copied up to here
        shift = 0  # new offset minus old offset of what follows
        for i in range(len(actions)):
            a = actions[i]
            result = _item_result(items[i], a.kind)
            if result is None:
                return IdsUnusable(f"primary item {i} is not the result of a {a.kind}")
            if a.id is not None:
                kept.append(_moved(a, shift))
                origin.append(i)
                continue
            item_status = _status_of(result)
            if item_status < 0:
                return IdsUnusable(f"primary item {i} has no status")
            if not _ok(item_status):
                parts.append(body[prev : a.line_start])
                prev = a.src_end
                shift -= a.src_end - a.line_start
                continue
            new_id = result.get("_id")
            if not isinstance(new_id, str) or not new_id:
                return IdsUnusable(f"primary item {i} succeeded without an _id")
            meta = dict(a.meta) if a.meta is not None else {}
            meta["_id"] = new_id
            line = orjson.dumps({a.kind: meta}) + b"\n"
            parts.append(body[prev : a.line_start])
            parts.append(line)
            prev = a.line_end
            start = a.line_start + shift
            end = start + len(line)
            kept.append(
                _Action(
                    a.kind, a.index, new_id, a.plain, None, start, end, end + a.src_end - a.line_end
                )
            )
            origin.append(i)
            shift += len(line) - (a.line_end - a.line_start)
        if not kept:
            return IdsSkip("the primary failed every action: it created no document")
        parts.append(body[prev:])
        out = EsRequest(
            self.method, self.target, b"".join(parts), _BULK, _bulk_keys(kept, self._keys.scope)
        )
        out._actions = kept
        out._origin = origin
        out._primary_count = len(actions)
        return out

    def divergences(
        self,
        primary_status: int,
        primary_answer: bytes,
        primary_truncated: bool,
        shadow_status: int,
        shadow_answer: bytes,
        shadow_truncated: bool,
    ) -> list[Divergent]:
        """The keys that may differ after the shadow answered this copy; the primary's answer
        is the one the copy was built from. Not a `_bulk`: a 2xx on one side only. A `_bulk`:
        the same per overall status, then per item when both sides succeeded; an answer that
        cannot be read makes every key a suspect (`answer_unusable`)."""
        p_ok = _ok(primary_status)
        s_ok = _ok(shadow_status)
        if p_ok != s_ok:
            detail = _pair_detail(
                primary_status,
                "" if p_ok or primary_truncated else _error_type(_load(primary_answer)),
                shadow_status,
                "" if s_ok or shadow_truncated else _error_type(_load(shadow_answer)),
            )
            return self._every_key(STATUS_MISMATCH, detail)
        if self._kind != _BULK or not p_ok:
            return []
        return self._bulk_divergences(
            primary_answer, primary_truncated, shadow_answer, shadow_truncated
        )

    def _bulk_divergences(
        self,
        primary_answer: bytes,
        primary_truncated: bool,
        shadow_answer: bytes,
        shadow_truncated: bool,
    ) -> list[Divergent]:
        if primary_truncated:
            return self._every_key(ANSWER_UNUSABLE, "primary answer cut short")
        if shadow_truncated:
            return self._every_key(ANSWER_UNUSABLE, "shadow answer cut short")
        p_items = _items(primary_answer)
        if p_items is None:
            return self._every_key(ANSWER_UNUSABLE, "primary answer has no items list")
        s_items = _items(shadow_answer)
        if s_items is None:
            return self._every_key(ANSWER_UNUSABLE, "shadow answer has no items list")
        if not self._bulk_ok:
            # the copy went unchanged (nothing could be rewritten): both servers read the same
            # bytes, so their items correspond one to one; which documents they are is unknown
            return _positional(p_items, s_items)
        actions = self._actions
        origin = self._origin
        expected = self._primary_count if origin is not None else len(actions)
        if len(p_items) != expected:
            return self._every_key(
                ANSWER_UNUSABLE, f"primary answered {len(p_items)} items for {expected} actions"
            )
        if len(s_items) != len(actions):
            return self._every_key(
                ANSWER_UNUSABLE,
                f"shadow answered {len(s_items)} items for {len(actions)} actions",
            )
        out: list[Divergent] = []
        for i in range(len(actions)):
            a = actions[i]
            p = _item_result(p_items[origin[i] if origin is not None else i], a.kind)
            if p is None:
                return self._every_key(ANSWER_UNUSABLE, f"primary item {i} is not a {a.kind}")
            s = _item_result(s_items[i], a.kind)
            if s is None:
                return self._every_key(ANSWER_UNUSABLE, f"shadow item {i} is not a {a.kind}")
            p_status = _status_of(p)
            s_status = _status_of(s)
            if p_status < 0 or s_status < 0:
                side = "primary" if p_status < 0 else "shadow"
                return self._every_key(ANSWER_UNUSABLE, f"{side} item {i} has no status")
            if _ok(p_status) != _ok(s_status):
                out.append(Divergent(a.label(), BULK_ITEM, _item_detail(p_status, p, s_status, s)))
        return out

    def _every_key(self, reason: str, detail: str) -> list[Divergent]:
        """One Divergent per key label; an index the copy touched without a known id (an
        id-less write) is a suspect as a whole (label `index`)."""
        labels = self._keys.labels()
        if not self._keys.scope:
            seen = set(labels)
            for group in self._keys.shared:
                if group not in seen:
                    seen.add(group)
                    labels.append(group)
        return [Divergent(label, reason, detail) for label in labels]

    def __repr__(self) -> str:
        return f"EsRequest({self.method} {self.target!r}, {self._keys!r})"


# --- parsing -------------------------------------------------------------------------------


def parse_request(method: str, target: bytes, body: bytes) -> EsRequest:
    """Understand one request (see the module docstring for what each kind becomes).

    `target` is the request target (origin form, or absolute form); path segments are
    percent-decoded; trailing slashes are ignored, as Elasticsearch's router does."""
    path, _, query = _path_of(target).partition(b"?")
    raw = path.split(b"/")
    # "/a/b/" -> ["a", "b"]: the leading "" of the absolute path, and trailing ones
    start = 1 if raw and not raw[0] else 0
    stop = len(raw)
    while stop > start and not raw[stop - 1]:
        stop -= 1
    raw = raw[start:stop]
    if method in _READ_METHODS:
        return EsRequest(method, target, body, _READ, _NO_KEYS)
    if not raw:
        return EsRequest(method, target, body, _DOC, SCOPE_BARRIER)
    segs = [_segment(s) for s in raw]
    first = segs[0]
    if first.startswith("_"):
        op = first
        index = ""
        rest = segs[1:]
    else:
        op = segs[1] if len(segs) > 1 else ""
        index = first
        rest = segs[2:]
    if op in _READS:
        return EsRequest(method, target, body, _READ, _NO_KEYS)
    if op == "_bulk" and not rest and method in ("POST", "PUT"):
        return _parse_bulk(method, target, body, index)
    if not index:
        if op == "_reindex" and not rest and method == "POST":
            return EsRequest(method, target, body, _DOC, _reindex_keys(body))
        # templates, POST /_aliases, cluster settings, pipelines, snapshots, anything else
        return EsRequest(method, target, body, _DOC, SCOPE_BARRIER)
    plain = _plain(index)
    if op == "_doc" and not rest and method == "POST":
        req = EsRequest(
            method, target, body, _DOC_NEW, OrderKeys(shared=(index,)) if plain else SCOPE_BARRIER
        )
        req._generated = True
        req._index_segment = raw[0]
        req._query = query
        return req
    if not plain:
        return EsRequest(method, target, body, _DOC, SCOPE_BARRIER)
    if len(rest) == 1 and (
        (op == "_doc" and method in ("PUT", "POST", "DELETE"))
        or (op == "_create" and method in ("PUT", "POST"))
        or (op == "_update" and method == "POST")
    ):
        return EsRequest(method, target, body, _DOC, OrderKeys(items=((index, rest[0]),)))
    if op in _SECOND_NAME and len(rest) == 1:
        if not _plain(rest[0]):
            return EsRequest(method, target, body, _DOC, SCOPE_BARRIER)
        return EsRequest(method, target, body, _DOC, OrderKeys(groups=(index, rest[0])))
    # PUT/DELETE /{index}, _mapping, _settings, _alias, _open, _close, _delete_by_query,
    # _update_by_query, _rollover, ... and any other write naming an index first
    return EsRequest(method, target, body, _DOC, OrderKeys(groups=(index,)))


def _parse_bulk(method: str, target: bytes, body: bytes, default: str) -> EsRequest:
    """Find the action lines of an NDJSON `_bulk` body and parse each (never the sources).

    As Elasticsearch reads it: a blank line where an action is expected is skipped; the line
    after an index/create/update action is its source, whatever it holds; the last line may
    lack its newline. An action that cannot be read stops the parse: the request becomes a
    scope barrier and its ids unusable, since which item answers which action is then
    unknown."""
    actions: list[_Action] = []
    problem = ""
    unknown_ids = False  # the line that stopped the parse may have been an id-less action
    generated = False
    scope = False
    n = len(body)
    pos = 0
    while pos < n:
        nl = body.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        line = body[pos : end if nl < 0 else nl]
        if not line.strip(b" \t\r"):
            pos = end
            continue
        doc = _load(line)
        if not isinstance(doc, dict) or len(doc) != 1:
            problem = f"line at byte {pos} is not an action"
            unknown_ids = True
            break
        kind = ""
        meta: object = None
        for k, v in doc.items():
            kind = str(k)
            meta = v
        if kind not in _BULK_KINDS:
            problem = f"unknown action {kind[:40]!r} at byte {pos}"
            unknown_ids = True
            break
        if not isinstance(meta, dict):
            problem = f"{kind} action at byte {pos} has no metadata object"
            unknown_ids = True
            break
        id_ = _action_id(meta.get("_id"))
        if id_ is None:
            problem = f"{kind} action at byte {pos} has an _id that is not a string"
            unknown_ids = True
            break
        if not id_ and kind in ("update", "delete"):
            problem = f"{kind} action at byte {pos} has no _id"
            break
        needs_id = not id_
        raw_index = meta.get("_index")
        if raw_index is None:
            index = default
        elif isinstance(raw_index, str) and raw_index:
            index = raw_index
        else:
            index = ""
        if not index:
            problem = f"{kind} action at byte {pos} names no usable index"
            generated = generated or needs_id
            break
        if kind == "delete":
            src_end = end
        elif end >= n:
            problem = f"{kind} action at byte {pos} has no source line"
            generated = generated or needs_id
            break
        else:
            nl = body.find(b"\n", end)
            src_end = n if nl < 0 else nl + 1
        plain = _plain(index)
        scope = scope or not plain
        generated = generated or needs_id
        actions.append(
            _Action(
                kind,
                index,
                None if needs_id else id_,
                plain,
                meta if needs_id else None,
                pos,
                end,
                src_end,
            )
        )
        pos = src_end
    if problem:
        req = EsRequest(method, target, body, _BULK, SCOPE_BARRIER)
        req._bulk_ok = False
        req._problem = problem
        req._generated = generated or unknown_ids
        return req
    req = EsRequest(method, target, body, _BULK, _bulk_keys(actions, scope))
    req._actions = actions
    req._generated = generated
    return req


def _bulk_keys(actions: list[_Action], scope: bool) -> OrderKeys:
    if scope:
        return SCOPE_BARRIER
    items: dict[tuple[str, str], None] = {}
    shared: dict[str, None] = {}
    for a in actions:
        if a.id is None:
            shared[a.index] = None
        else:
            items[(a.index, a.id)] = None
    return OrderKeys(items=tuple(items), shared=tuple(shared))


def _action_id(value: object) -> str | None:
    """A `_bulk` action's `_id`: "" when absent (or empty: the server then picks one, or fails
    the item); an integer as Elasticsearch writes it; None for anything else (a float's text
    form is not knowable from its value, null and booleans are not ids)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _reindex_keys(body: bytes) -> OrderKeys:
    """`POST /_reindex`: a barrier for the destination and the source indices (writes to a
    source before the reindex must land before it reads). A scope barrier when the body cannot
    be read, names an expression, or has a script (which may send documents to any index)."""
    doc = _load(body)
    if not isinstance(doc, dict) or "script" in doc:
        return SCOPE_BARRIER
    dest = doc.get("dest")
    source = doc.get("source")
    if not isinstance(dest, dict) or not isinstance(source, dict):
        return SCOPE_BARRIER
    dest_index = dest.get("index")
    if not isinstance(dest_index, str) or not _plain(dest_index):
        return SCOPE_BARRIER
    groups = [dest_index]
    if "remote" not in source:  # a remote source is another cluster's
        names = source.get("index")
        listed: list[object] = names if isinstance(names, list) else [names]
        for name in listed:
            if not isinstance(name, str) or not _plain(name):
                return SCOPE_BARRIER
            groups.append(name)
    return OrderKeys(groups=tuple(dict.fromkeys(groups)))


# --- small pure helpers --------------------------------------------------------------------


def _path_of(target: bytes) -> bytes:
    """The path and query of an origin-form or absolute-form request target."""
    if target.startswith((b"http://", b"https://")):
        slash = target.find(b"/", target.find(b"//") + 2)
        return target[slash:] if slash >= 0 else b"/"
    return target


def _segment(raw: bytes) -> str:
    """A percent-decoded path segment (`a%2Fb` -> `a/b`); bad UTF-8 becomes U+FFFD."""
    return unquote_to_bytes(raw).decode("utf-8", "replace")


def _plain(index: str) -> bool:
    """One index (or alias) name, not an expression that may name several: no wildcard or
    list, not `_all`, no exclusion (`-`) or inclusion (`+`) prefix."""
    return bool(index) and "*" not in index and "," not in index and index[0] not in "-+_"


def _without_op_type(query: bytes) -> bytes:
    """The query without `op_type`: `_create` implies it, and refuses any other value."""
    if b"op_type" not in query:
        return query
    return b"&".join(p for p in query.split(b"&") if _segment(p.partition(b"=")[0]) != "op_type")


def _ok(status: int) -> bool:
    return 200 <= status < 300


def _load(data: bytes) -> object:
    """The JSON value of `data`, or None when it is not JSON."""
    try:
        value: object = orjson.loads(data)
    except ValueError:
        return None
    return value


def _items(answer: bytes) -> list[object] | None:
    doc = _load(answer)
    if not isinstance(doc, dict):
        return None
    items = doc.get("items")
    return items if isinstance(items, list) else None


def _item_result(item: object, kind: str) -> dict[str, object] | None:
    """The result object of one `_bulk` answer item, if it is the result of a `kind` action."""
    if not isinstance(item, dict) or len(item) != 1:
        return None
    result = item.get(kind)
    return result if isinstance(result, dict) else None


def _status_of(result: dict[str, object]) -> int:
    status = result.get("status")
    if isinstance(status, int) and not isinstance(status, bool):
        return status
    return -1


def _error_type(doc: object) -> str:
    """The `error.type` of an error answer or a failed bulk item (`error` may be a bare
    string in old versions); "" when there is none."""
    if not isinstance(doc, dict):
        return ""
    error = doc.get("error")
    if isinstance(error, dict):
        kind = error.get("type")
        return kind[:100] if isinstance(kind, str) else ""
    return error[:100] if isinstance(error, str) else ""


def _pair_detail(p_status: int, p_error: str, s_status: int, s_error: str) -> str:
    p = f"primary {p_status} {p_error}" if p_error else f"primary {p_status}"
    s = f"shadow {s_status} {s_error}" if s_error else f"shadow {s_status}"
    return f"{p}, {s}"


def _item_detail(p_status: int, p: dict[str, object], s_status: int, s: dict[str, object]) -> str:
    return _pair_detail(
        p_status,
        "" if _ok(p_status) else _error_type(p),
        s_status,
        "" if _ok(s_status) else _error_type(s),
    )


def _positional(p_items: list[object], s_items: list[object]) -> list[Divergent]:
    """Items of an unreadable bulk sent unchanged, compared one to one; every key is `*`."""
    if len(p_items) != len(s_items):
        return [
            Divergent(
                SCOPE_LABEL,
                ANSWER_UNUSABLE,
                f"primary answered {len(p_items)} items, shadow {len(s_items)}",
            )
        ]
    out: list[Divergent] = []
    for i in range(len(p_items)):
        p_item = p_items[i]
        kind = ""
        if isinstance(p_item, dict) and len(p_item) == 1:
            for k in p_item:
                kind = str(k)
        p = _item_result(p_item, kind)
        s = _item_result(s_items[i], kind)
        if p is None or s is None or _status_of(p) < 0 or _status_of(s) < 0:
            return [Divergent(SCOPE_LABEL, ANSWER_UNUSABLE, f"item {i} does not match")]
        p_status = _status_of(p)
        s_status = _status_of(s)
        if _ok(p_status) != _ok(s_status):
            out.append(Divergent(SCOPE_LABEL, BULK_ITEM, _item_detail(p_status, p, s_status, s)))
    return out


def _moved(a: _Action, shift: int) -> _Action:
    """`a` as it stands in a rebuilt body, `shift` bytes further."""
    if not shift:
        return a
    return _Action(
        a.kind,
        a.index,
        a.id,
        a.plain,
        a.meta,
        a.line_start + shift,
        a.line_end + shift,
        a.src_end + shift,
    )
