"""Divergence-ledger labels read back as what to verify.

The proxy writes a copy's order keys into the ledger as labels (`shadow/keys.py`): `index/id`
for one document, `index` for a whole index, `*` for the whole ordering scope. The label is
split at the first `/`: index names cannot hold `/`, ids can (`orders/a/b` is id `a/b`).
Anything else (a generic extractor's key such as `/accounts/9`, or a word that cannot be an
index name) did not come from an Elasticsearch route, so verify leaves it alone and says so.

The ledger is read through `Ledger`, the two calls verify needs (`Store` has them), so that
verify depends on those two and nothing else of the store's.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["SCOPE_LABEL", "Ledger", "Suspects", "index_name_ok", "matches", "parse_labels"]

#: the label of a scope barrier (`shadow.keys.SCOPE_LABEL`; verify may not import shadow/)
SCOPE_LABEL = "*"

_BAD_INDEX_CHARS = frozenset('\\/*?"<>| ,#:')


class Ledger(Protocol):
    """The divergence ledger as the store offers it (`Store.suspect_keys/resolve_keys`)."""

    def suspect_keys(
        self, route: str | None = None, target: str | None = None, scope: str | None = None
    ) -> list[str]: ...

    def resolve_keys(
        self,
        keys: Iterable[str],
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
    ) -> int: ...


def index_name_ok(name: str) -> bool:
    """Elasticsearch's rules for an index name (lower case, no `\\ / * ? " < > | , # :` or
    space, not `.`/`..`, not starting with `-`, `_` or `+`, at most 255 bytes)."""
    return (
        bool(name)
        and name not in (".", "..")
        and name == name.lower()
        and not name.startswith(("-", "_", "+"))
        and not (_BAD_INDEX_CHARS & set(name))
        and len(name.encode()) <= 255
    )


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether `--index` patterns select the index `name`.

    Patterns apply in order, like Elasticsearch's index expressions: `logs-*` adds, `-logs-old*`
    takes away (a leading `-` excludes only after an inclusion). `*` never reaches a name
    starting with `.` (system and hidden indices) unless the pattern itself starts with `.`.
    No patterns means every index not starting with `.`.
    """
    patterns = list(patterns) or ["*"]
    selected = False
    for i, pattern in enumerate(patterns):
        exclude = pattern.startswith("-") and i > 0
        pat = pattern[1:] if exclude else pattern
        if name.startswith(".") and not pat.startswith("."):
            continue
        if fnmatch.fnmatchcase(name, pat):
            selected = not exclude
    return selected


@dataclass(slots=True)
class Suspects:
    """What the ledger says to verify."""

    #: `*`: every selected index, whole
    scope: bool = False
    #: indices suspect as a whole
    indices: set[str] = field(default_factory=set)
    #: index -> suspect ids (ids of a whole-suspect index are left out: the walk covers them)
    ids: dict[str, set[str]] = field(default_factory=dict)
    #: labels that are not Elasticsearch keys
    ignored: list[str] = field(default_factory=list)
    #: labels whose index `--index` does not select
    unselected: list[str] = field(default_factory=list)
    #: every label kept, as read (what may be resolved afterwards)
    labels: list[str] = field(default_factory=list)


def parse_labels(labels: Iterable[str], patterns: Iterable[str] = ()) -> Suspects:
    """Sort ledger labels into scope, whole indices and single documents (see module doc)."""
    patterns = list(patterns)
    out = Suspects()
    ids: dict[str, set[str]] = {}
    for label in dict.fromkeys(labels):
        if label == SCOPE_LABEL:
            out.scope = True
            out.labels.append(label)
            continue
        index, slash, doc_id = label.partition("/")
        if not index_name_ok(index) or (slash and not doc_id):
            out.ignored.append(label)
            continue
        if not matches(index, patterns):
            out.unselected.append(label)
            continue
        out.labels.append(label)
        if slash:
            ids.setdefault(index, set()).add(doc_id)
        else:
            out.indices.add(index)
    out.ids = {index: found for index, found in ids.items() if index not in out.indices}
    return out
