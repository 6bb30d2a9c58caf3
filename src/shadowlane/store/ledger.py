"""The divergence ledger's record: one copy that may have left a shadow unlike its primary.

Written by the shadow pipeline (on the event loop, handed to the comparator's thread to store)
and read by the admin API, `report`, the dashboard and `verify --suspects`. `keys` are the
copy's order-key labels (`shadow/keys.py`): `index/id`, `index` for a whole index, `*` for the
whole scope, or a generic extractor's key.

`LedgerRow` and `LedgerCountRow` are what the store's ledger queries return (store/base.py);
`LedgerQueries` is that read side as a protocol, for the API and `report`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol


@dataclass(frozen=True, slots=True)
class Divergence:
    ts: float
    route: str
    target: str
    #: the ordering scope's name
    scope: str
    #: one of `shadow.outcomes.DIVERGENCE_REASONS`
    reason: str
    keys: tuple[str, ...]
    request_id: str
    method: str
    uri: str
    #: a few words more (the statuses, the item's error), for a person
    detail: str = ""


#: the label of the whole scope; an entry recorded without keys is stored with it (nothing
#: says which documents the copy touched, so all of them are suspect)
SCOPE_KEY = "*"


class LedgerRow(NamedTuple):
    """One stored ledger entry. `keys` are all its keys, in the order recorded; `resolved_at`
    is when its last suspect key was resolved, None while any is open."""

    id: int
    ts: float
    route: str
    target: str
    scope: str
    reason: str
    keys: tuple[str, ...]
    request_id: str
    method: str
    uri: str
    detail: str
    resolved_at: float | None


class LedgerCountRow(NamedTuple):
    """Entries of one (route, target) with one reason."""

    route: str
    target: str
    reason: str
    n: int


class LedgerQueries(Protocol):
    """The read side of the ledger as the admin API and `report` use it (a `Store` has it).
    Callable from any thread."""

    def ledger(
        self,
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        reason: str | None = None,
        include_resolved: bool = False,
        limit: int = 100,
    ) -> list[LedgerRow]: ...

    def ledger_counts(
        self,
        route: str | None = None,
        target: str | None = None,
        include_resolved: bool = False,
        *,
        scope: str | None = None,
    ) -> list[LedgerCountRow]: ...

    def suspect_keys(
        self,
        route: str | None = None,
        target: str | None = None,
        scope: str | None = None,
        *,
        limit: int | None = None,
    ) -> list[str]: ...
