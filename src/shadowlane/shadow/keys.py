"""Order keys: what a shadow copy may conflict with inside its ordering scope.

A copy's keys are resources it needs, each held shared or exclusive, in two levels under the
scope, like a lock manager's intention locks:
  - an *item* `(group, item)`: one document (`("orders", "17")`) or one key of a generic
    extractor (group ""); held exclusive, and its group is held shared;
  - a *group barrier*: the whole group (one index), exclusive: every copy of the group that
    came before ends first, every one after waits;
  - a *scope barrier*: everything in the scope, exclusive.
Two copies conflict when one needs exclusive what the other needs at all. The scheduler
(`shadow/ordering.py`) sends a copy when no earlier pending copy of its scope conflicts with it.

`labels()` is how keys are written in the divergence ledger and read back by `verify`:
`group/item` (`orders/17`), a bare item for group "" (`/accounts/9`), `group` for a group
barrier (`orders`), `*` for the scope.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import orjson

from shadowlane.wire.messages import Request

#: the ledger label of a scope barrier
SCOPE_LABEL = "*"


class OrderKeys:
    """The key set of one copy (see the module docstring)."""

    __slots__ = ("groups", "items", "resources", "scope", "shared")

    def __init__(
        self,
        items: tuple[tuple[str, str], ...] = (),
        groups: tuple[str, ...] = (),
        scope: bool = False,
        shared: tuple[str, ...] = (),
    ) -> None:
        #: (group, item) pairs held exclusive (each group held shared)
        self.items = items
        #: groups held exclusive (barriers for one group, e.g. one index)
        self.groups = groups
        #: the whole scope held exclusive
        self.scope = scope
        #: groups held shared with no item: a copy that touches a group without a known item
        #: (a `_bulk` create whose id only the target will choose) still waits for the group's
        #: barriers
        self.shared = shared
        #: what the key set holds in a scope, when it was worked out where the keys were
        #: found (the write worker, `shadow/offload.py`: a big `_bulk`'s documents never cross
        #: to the loop); then the fields above are just `scope`, what the ledger names if the
        #: worker is lost before it can name the documents. None: from the fields.
        self.resources: list[tuple[str, bool]] | None = None

    @property
    def empty(self) -> bool:
        """No keys at all: the copy conflicts with nothing but scope barriers."""
        return not (self.items or self.groups or self.scope or self.shared)

    def labels(self) -> list[str]:
        """The keys as the ledger writes them (see the module docstring), in a stable order."""
        if self.scope:
            return [SCOPE_LABEL]
        out = list(dict.fromkeys(self.groups))
        barred = set(self.groups)
        for group, item in self.items:
            if group not in barred:
                out.append(f"{group}/{item}" if group else item)
        return list(dict.fromkeys(out))

    def __repr__(self) -> str:
        return f"OrderKeys({self.labels()!r}, shared={self.shared!r})"


#: the key set of a copy that must wait for everything before it and hold up everything after
SCOPE_BARRIER = OrderKeys(scope=True)


#: a copy's key set from its request and the body it carries
KeysFn = Callable[[Request, bytes], OrderKeys]
_Part = Callable[[Request, bytes, list[str]], None]


def _pointer(doc: object, pointer: str) -> object:
    """RFC 6901: `/a/0/b`, with `~1` for `/` and `~0` for `~`; a missing step gives None."""
    for raw in pointer.split("/")[1:]:
        step = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict):
            doc = doc.get(step)
        elif isinstance(doc, list) and step.isdigit() and int(step) < len(doc):
            doc = doc[int(step)]
        else:
            return None
        if doc is None:
            return None
    return doc


def _scalar(value: object, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int | float):
        out.append(str(value))
    elif isinstance(value, list):  # a list of ids: each is a key of the set
        for v in value:
            if not isinstance(v, list):
                _scalar(v, out)


def _part(spec: str) -> tuple[_Part, bool]:
    """One extractor; the flag says whether it reads the body as JSON."""
    kind, _, name = spec.partition(":")
    if kind == "path":
        return (lambda req, body, out: out.append(req.path)), False
    if kind == "header":

        def header(req: Request, body: bytes, out: list[str]) -> None:
            value = req.header(name)
            if value is not None:
                out.append(value)

        return header, False
    if kind == "query":

        def query(req: Request, body: bytes, out: list[str]) -> None:
            value = req.query_arg(name)
            if value is not None:
                out.append(value)

        return query, False
    if kind == "path_regex":
        regex = re.compile(name)

        def captures(req: Request, body: bytes, out: list[str]) -> None:
            m = regex.search(req.path)
            if m is not None:
                groups = [g for g in m.groups() if g is not None]
                out.append("/".join(groups) if m.re.groups else m.group(0))

        return captures, False
    if kind == "json":
        return (lambda req, doc, out: None), True
    raise ValueError(f"unknown order key {spec!r}")


def key_extractor(specs: list[str]) -> KeysFn:
    """The key set of the configured extractors (validated by config/shadows.py).

    Keys are compared by value, whichever extractor found them: `path_regex:^/orders/(\\d+)`
    on one route and `json:/order_id` on another give the same key for the same order, which
    is what lets two routes share a scope. A copy none of them finds a key in is a scope
    barrier: it cannot be placed, so it goes alone, never guessed at.
    """
    parts: list[_Part] = []
    pointers: list[str] = []
    for spec in specs:
        fn, reads_json = _part(spec)
        if reads_json:
            pointers.append(spec.partition(":")[2])
        else:
            parts.append(fn)

    def keys(req: Request, body: bytes) -> OrderKeys:
        found: list[str] = []
        for fn in parts:
            fn(req, body, found)
        if pointers and body:
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                doc = None
            if doc is not None:
                for ptr in pointers:
                    _scalar(_pointer(doc, ptr), found)
        if not found:
            return SCOPE_BARRIER
        return OrderKeys(items=tuple(("", k) for k in dict.fromkeys(found)))

    return keys
