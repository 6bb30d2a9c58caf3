"""Ordering scopes: copies that touch the same keys reach their target one after the other.

A scope is one name and one target backend; the shadows of several routes can share it (a
`_bulk` route and a single-document route of the same cluster), so a batch and an update of
the same document are ordered although their paths differ. "Earlier" is the order in which the
copies were admitted, which is the order in which their primaries answered: the order the
primary applied them in, as far as the proxy can see it.

How: a lock manager with FIFO queues, one per resource (`shadow/keys.py` says which resources
a key set needs, shared or exclusive). A copy is admitted by enqueueing it on every resource it
needs, all at once; it may be sent once it holds all of them. A resource grants its queue in
order: one exclusive holder, or a run of shared ones. Because every copy enqueues everywhere at
admission, each queue is in admission order, so an older copy is never behind a younger one on
any resource and there is no deadlock; copies with disjoint keys hold disjoint resources and go
in parallel, limited only by their lanes' `max_in_flight`.

Costs: per copy, one dict lookup and a counter per key on admission and on release; a queue
only exists while some copy holds or waits for its resource, so memory follows what is pending,
not the number of keys ever seen. The resource for the scope itself is shared by every copy and
only kept when the scope may see scope barriers; without one it would be a counter every copy
touches for nothing.

A copy waiting here counts against its lane's `queue` and byte bounds (the lane does that),
so a target that falls behind sheds copies (counted, and written to the divergence ledger)
rather than growing this.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from shadowlane.shadow.keys import OrderKeys

#: resource names: the scope, a group, an item (NUL cannot appear in a key that came from a
#: header, a path or a JSON string without being escaped, so the names cannot collide)
_SCOPE = "\x00"


def _group(group: str) -> str:
    return "g\x00" + group


def _item(group: str, item: str) -> str:
    return "i\x00" + group + "\x00" + item


#: a copy that names more items than this in one group holds the whole group instead (lock
#: escalation, as databases do): admitting and releasing a copy costs a dict entry per
#: resource, and a 1 MiB `_bulk` of small documents names thousands (~1 ms of the loop, twice);
#: the group held exclusive orders it with everything of that group, which is stricter, never
#: looser. Its ledger labels are still its documents (`OrderKeys.labels`).
ESCALATE_AT = 256


def needs(keys: OrderKeys, with_scope: bool) -> list[tuple[str, bool]]:
    """The (resource, exclusive) pairs a key set holds, each resource once."""
    if keys.resources is not None and with_scope:
        return keys.resources
    if keys.scope:
        return [(_SCOPE, True)]
    out: dict[str, bool] = {}
    if with_scope:
        out[_SCOPE] = False
    for group in keys.groups:
        out[_group(group)] = True
    for group in keys.shared:
        out.setdefault(_group(group), False)
    items = keys.items
    escalated: set[str] = set()
    if len(items) > ESCALATE_AT:
        per_group: dict[str, int] = {}
        for group, _item_name in items:
            per_group[group] = per_group.get(group, 0) + 1
        for group, n in per_group.items():
            if n > ESCALATE_AT:
                escalated.add(group)
                out[_group(group)] = True
    for group, item in items:
        if group in escalated:
            continue
        out.setdefault(_group(group), False)
        out[_item(group, item)] = True
    return list(out.items())


class Waiter:
    """One admitted copy: what it holds or waits for, until it is released."""

    __slots__ = ("blocked", "needs", "on_ready")

    def __init__(self, needs: list[tuple[str, bool]], on_ready: Callable[[], None]) -> None:
        self.needs = needs
        #: resources not granted yet; 0 means the copy may go
        self.blocked = 0
        self.on_ready = on_ready


class _Resource:
    __slots__ = ("exclusive", "granted", "waiting")

    def __init__(self) -> None:
        self.granted = 0
        self.exclusive = False
        self.waiting: deque[tuple[Waiter, bool]] = deque()


class BuildLine:
    """The copies of a scope still being built, and every copy of the scope after them, in
    the order their primaries answered: a copy built off the loop (a big `_bulk`, see
    `shadow/offload.py`) holds its place here, so the copies behind it are admitted after it,
    whatever finishes first. Empty almost always: then a copy goes straight to `admit`."""

    __slots__ = ("_places",)

    def __init__(self) -> None:
        self._places: deque[list[Callable[[], None] | None]] = deque()

    @property
    def busy(self) -> bool:
        return bool(self._places)

    def reserve(self) -> list[Callable[[], None] | None]:
        """A place at the end of the line, to fill with `ready`."""
        place: list[Callable[[], None] | None] = [None]
        self._places.append(place)
        return place

    def ready(self, place: list[Callable[[], None] | None], go: Callable[[], None]) -> None:
        """The copy of `place` is built: `go` admits (or drops) it, once every place before it
        has gone."""
        place[0] = go
        places = self._places
        while places and places[0][0] is not None:
            step = places.popleft()[0]
            assert step is not None
            step()


class OrderScope:
    """One scope (name, target): admits copies, tells each when it may go."""

    __slots__ = ("_resources", "line", "name", "pending", "target", "with_scope")

    def __init__(self, name: str, target: str, with_scope: bool = True) -> None:
        self.name = name
        self.target = target
        #: keep the scope-wide resource (some shadow of the scope can send scope barriers)
        self.with_scope = with_scope
        self._resources: dict[str, _Resource] = {}
        #: copies built off the loop hold their place here until they are admitted
        self.line = BuildLine()
        #: copies admitted and not released yet
        self.pending = 0

    def waiter(self, keys: OrderKeys, on_ready: Callable[[], None]) -> Waiter:
        """A copy's place in this scope, to `admit`."""
        return Waiter(needs(keys, self.with_scope), on_ready)

    def admit(self, w: Waiter) -> bool:
        """Enqueue a copy. True: nothing before it conflicts, it may be sent now (`on_ready` is
        not called). False: it waits; `on_ready` is called when the copies before it that
        conflict have been released. Never waits itself."""
        resources = self._resources
        for name, exclusive in w.needs:
            res = resources.get(name)
            if res is None:
                res = resources[name] = _Resource()
            if not res.waiting and (res.granted == 0 or not (exclusive or res.exclusive)):
                res.granted += 1
                res.exclusive = exclusive
            else:
                res.waiting.append((w, exclusive))
                w.blocked += 1
        self.pending += 1
        return w.blocked == 0

    def release(self, w: Waiter) -> None:
        """The copy ended (answered, failed, timed out, dropped): what waited for it may go.

        Also for a copy that never became ready (shed while waiting): it leaves the queues it
        waits in and gives back what it was granted."""
        ready: list[Waiter] = []
        resources = self._resources
        for name, _exclusive in w.needs:
            res = resources.get(name)
            if res is None:
                continue
            if not (w.blocked and self._withdraw(res, w)):
                res.granted -= 1
            self._grant(res, ready)
            if res.granted == 0 and not res.waiting:
                del resources[name]
        w.needs = []
        w.blocked = 0
        self.pending -= 1
        for r in ready:
            r.on_ready()

    @staticmethod
    def _withdraw(res: _Resource, w: Waiter) -> bool:
        """Take a never-granted waiter out of a queue; True if it was waiting in this one."""
        for i, (other, _) in enumerate(res.waiting):
            if other is w:
                del res.waiting[i]
                return True
        return False

    @staticmethod
    def _grant(res: _Resource, ready: list[Waiter]) -> None:
        """Grant the head of the queue while it is compatible with what is held: one exclusive
        holder, or any number of shared ones (a withdrawn exclusive waiter can leave shared
        waiters at the head while shared holders remain)."""
        waiting = res.waiting
        while waiting:
            w, exclusive = waiting[0]
            if res.granted and (exclusive or res.exclusive):
                break
            waiting.popleft()
            res.granted += 1
            res.exclusive = exclusive
            w.blocked -= 1
            if w.blocked == 0:
                ready.append(w)
            if exclusive:
                break

    def resources(self) -> int:
        """Resources held or waited for now (tests: memory follows what is pending)."""
        return len(self._resources)
