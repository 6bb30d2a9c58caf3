"""`GET /api/ledger`: the divergence ledger as JSON, for people, the dashboard and scripts.

One answer holds what a reader of the ledger asks first, under the same filters:

- `entries`: the newest entries (open ones, or all with `resolved=1`), each with its keys;
- `counts`: open entries per (route, target, reason);
- `suspect_keys`: the distinct keys still suspect, sorted (at most `MAX_SUSPECT_KEYS`;
  `suspect_keys_truncated` says when there were more: `shadowlane verify --suspects` reads
  them all from the store);
- `open`: how many entries are open.

Parameters (all optional): `route`, `target`, `scope`, `reason` (one of the divergence
reasons), `limit` (entries, 1..`MAX_LEDGER_LIMIT`, default `DEFAULT_LEDGER_LIMIT`) and
`resolved` (`1` to list resolved entries too; counts, keys and `open` stay about open ones).
Anything else, or a bad value, is a 400 naming the parameter: a typo that filtered nothing
would otherwise look like an empty ledger.

The handler is installed with the comparison API (`install_comparison_api(..., ledger=...)`)
and runs its queries the same way: in a worker thread, bounded and with a deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shadowlane.shadow.outcomes import DIVERGENCE_REASONS
from shadowlane.store import LedgerQueries

__all__ = [
    "DEFAULT_LEDGER_LIMIT",
    "MAX_LEDGER_LIMIT",
    "MAX_SUSPECT_KEYS",
    "LedgerFilter",
    "LedgerParamError",
    "LedgerQueries",
    "ledger_document",
    "parse_ledger_query",
]

DEFAULT_LEDGER_LIMIT = 100
MAX_LEDGER_LIMIT = 1000
#: suspect keys in one answer at most
MAX_SUSPECT_KEYS = 1000

_NAMES = ("route", "target", "scope")
_KNOWN = (*_NAMES, "reason", "limit", "resolved")
_BOOLEANS = {"1": True, "true": True, "0": False, "false": False}


@dataclass(frozen=True, slots=True)
class LedgerFilter:
    """The parameters of one `/api/ledger` request, checked."""

    route: str | None = None
    target: str | None = None
    scope: str | None = None
    reason: str | None = None
    limit: int = DEFAULT_LEDGER_LIMIT
    include_resolved: bool = False


class LedgerParamError(ValueError):
    """A bad parameter: `param` names it, the message says what is expected."""

    def __init__(self, param: str, message: str, value: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.value = value


def parse_ledger_query(query: dict[str, str]) -> LedgerFilter:
    """The filter of a request's query parameters; raises `LedgerParamError`."""
    for name, value in query.items():
        if name not in _KNOWN:
            raise LedgerParamError(name, f"unknown parameter; one of {', '.join(_KNOWN)}", value)
    names: dict[str, str | None] = {}
    for name in _NAMES:
        given = query.get(name)
        if given is not None and not given:
            raise LedgerParamError(name, "must not be empty (leave it out for all)", given)
        names[name] = given
    reason = query.get("reason")
    if reason is not None and reason not in DIVERGENCE_REASONS:
        raise LedgerParamError("reason", f"must be one of {', '.join(DIVERGENCE_REASONS)}", reason)
    limit = DEFAULT_LEDGER_LIMIT
    raw_limit = query.get("limit")
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LEDGER_LIMIT:
            raise LedgerParamError("limit", f"must be an integer 1..{MAX_LEDGER_LIMIT}", raw_limit)
        limit = int(raw_limit)
    raw_resolved = query.get("resolved")
    include_resolved = False
    if raw_resolved is not None:
        if raw_resolved.lower() not in _BOOLEANS:
            raise LedgerParamError("resolved", "must be 1 or 0", raw_resolved)
        include_resolved = _BOOLEANS[raw_resolved.lower()]
    return LedgerFilter(
        names["route"], names["target"], names["scope"], reason, limit, include_resolved
    )


def ledger_document(queries: LedgerQueries, f: LedgerFilter) -> dict[str, Any]:
    """The answer of `/api/ledger` for `f` (blocking: run it off the loop)."""
    entries = queries.ledger(
        f.route, f.target, f.scope, f.reason, include_resolved=f.include_resolved, limit=f.limit
    )
    counts = [
        c
        for c in queries.ledger_counts(f.route, f.target, scope=f.scope)
        if f.reason is None or c.reason == f.reason
    ]
    keys = queries.suspect_keys(f.route, f.target, f.scope, limit=MAX_SUSPECT_KEYS + 1)
    return {
        "entries": [{**e._asdict(), "keys": list(e.keys)} for e in entries],
        "counts": [c._asdict() for c in counts],
        "suspect_keys": keys[:MAX_SUSPECT_KEYS],
        "suspect_keys_truncated": len(keys) > MAX_SUSPECT_KEYS,
        "open": sum(c.n for c in counts),
    }
