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

#: the ledger label of a scope barrier
SCOPE_LABEL = "*"


class OrderKeys:
    """The key set of one copy (see the module docstring)."""

    __slots__ = ("groups", "items", "scope", "shared")

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
