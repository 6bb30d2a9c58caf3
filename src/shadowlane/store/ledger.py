"""The divergence ledger's record: one copy that may have left a shadow unlike its primary.

Written by the shadow pipeline (on the event loop, handed to the comparator's thread to store)
and read by the admin API, `report`, the dashboard and `verify --suspects`. `keys` are the
copy's order-key labels (`shadow/keys.py`): `index/id`, `index` for a whole index, `*` for the
whole scope, or a generic extractor's key.
"""

from __future__ import annotations

from dataclasses import dataclass


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
