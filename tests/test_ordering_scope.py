"""The ordering scope's rules, on the data structure itself (shadow/ordering.py).

The end-to-end behaviour (copies through the real proxy to real servers) is in
test_shadow_ordering.py and test_es_convergence.py; this checks the rules those rely on, with
every interleaving a random schedule finds, which no socket test can reach.
"""

from __future__ import annotations

import random

from shadowlane.shadow.keys import SCOPE_BARRIER, OrderKeys
from shadowlane.shadow.ordering import ESCALATE_AT, BuildLine, OrderScope, Waiter


class Run:
    """Admits copies and records when each becomes ready."""

    def __init__(self) -> None:
        self.scope = OrderScope("s", "t")
        self.ready: list[int] = []
        self.waiters: dict[int, Waiter] = {}

    def admit(self, n: int, keys: OrderKeys) -> None:
        w = self.scope.waiter(keys, lambda: self.ready.append(n))
        self.waiters[n] = w
        if self.scope.admit(w):
            self.ready.append(n)

    def release(self, n: int) -> None:
        self.scope.release(self.waiters.pop(n))


def doc(index: str, *ids: str) -> OrderKeys:
    return OrderKeys(items=tuple((index, i) for i in ids))


def test_disjoint_keys_go_together_and_shared_keys_wait_in_order() -> None:
    r = Run()
    r.admit(1, doc("i", "a"))
    r.admit(2, doc("i", "b"))
    r.admit(3, doc("i", "a", "c"))
    r.admit(4, doc("i", "a"))
    r.admit(5, doc("i", "c"))
    assert r.ready == [1, 2]
    r.release(2)
    assert r.ready == [1, 2]
    r.release(1)
    assert r.ready == [1, 2, 3]  # 4 waits for 3 (a), 5 waits for 3 (c)
    r.release(3)
    assert r.ready == [1, 2, 3, 4, 5]
    r.release(4)
    r.release(5)
    assert r.scope.resources() == 0 and r.scope.pending == 0


def test_index_barrier_waits_for_its_index_only_and_holds_later_copies() -> None:
    r = Run()
    r.admit(1, doc("i", "a"))
    r.admit(2, doc("j", "a"))
    r.admit(3, OrderKeys(groups=("i",)))  # e.g. DELETE /i
    r.admit(4, doc("i", "b"))
    r.admit(5, doc("j", "b"))
    r.admit(6, OrderKeys(shared=("i",)))  # a _bulk create without id in i
    assert r.ready == [1, 2, 5]
    r.release(1)
    assert r.ready == [1, 2, 5, 3]
    r.release(3)
    assert r.ready == [1, 2, 5, 3, 4, 6]


def test_a_copy_of_many_documents_holds_their_index_instead() -> None:
    """Lock escalation: past ESCALATE_AT items in one index, the copy holds the index (a few
    resources, not thousands); it is ordered as an index barrier would be, its other groups
    as items, and its ledger labels are still its documents."""
    r = Run()
    many = tuple(("i", f"d{n}") for n in range(ESCALATE_AT + 1))
    big = OrderKeys(items=(*many, ("j", "x")))
    r.admit(1, doc("i", "d5"))
    r.admit(2, big)
    r.admit(3, doc("i", "other"))  # no document in common with 2, but the same index
    r.admit(4, doc("j", "y"))  # 2 holds only j/x of j: this goes at once
    assert r.ready == [1, 4]
    assert r.scope.resources() <= 8
    r.release(1)
    assert r.ready == [1, 4, 2]
    r.release(2)
    assert r.ready == [1, 4, 2, 3]
    assert big.labels()[:2] == ["i/d0", "i/d1"] and len(big.labels()) == ESCALATE_AT + 2
    r.release(3)
    r.release(4)
    assert r.scope.resources() == 0 and r.scope.pending == 0


def test_the_build_line_admits_in_order_whatever_is_built_first() -> None:
    line = BuildLine()
    went: list[str] = []
    slow, quick = line.reserve(), line.reserve()
    assert line.busy
    line.ready(quick, lambda: went.append("quick"))
    assert went == []  # built first, but behind the slow one
    line.ready(slow, lambda: went.append("slow"))
    assert went == ["slow", "quick"] and not line.busy
    line.ready(line.reserve(), lambda: went.append("alone"))
    assert went[-1] == "alone"


def test_scope_barrier_waits_for_everything_and_holds_everything() -> None:
    r = Run()
    r.admit(1, doc("i", "a"))
    r.admit(2, doc("j", "b"))
    r.admit(3, SCOPE_BARRIER)
    r.admit(4, doc("k", "z"))
    assert r.ready == [1, 2]
    r.release(2)
    r.release(1)
    assert r.ready == [1, 2, 3]
    r.release(3)
    assert r.ready == [1, 2, 3, 4]


def test_a_copy_shed_while_waiting_lets_the_ones_behind_it_go() -> None:
    r = Run()
    r.admit(1, doc("i", "a"))
    r.admit(2, OrderKeys(groups=("i",)))  # waits for 1
    r.admit(3, doc("i", "b"))  # waits for the barrier 2
    assert r.ready == [1]
    r.release(2)  # shed before it was ready (circuit open, drain)
    assert r.ready == [1, 3]
    r.release(1)
    r.release(3)
    assert r.scope.resources() == 0


def conflicts(a: OrderKeys, b: OrderKeys) -> bool:
    if a.scope or b.scope:
        return True
    ga = set(a.groups)
    gb = set(b.groups)
    touched_a = ga | set(a.shared) | {g for g, _ in a.items}
    touched_b = gb | set(b.shared) | {g for g, _ in b.items}
    return bool(ga & touched_b or gb & touched_a or set(a.items) & set(b.items))


def random_keys(rng: random.Random) -> OrderKeys:
    roll = rng.random()
    if roll < 0.03:
        return SCOPE_BARRIER
    if roll < 0.1:
        return OrderKeys(groups=(rng.choice("ij"),))
    if roll < 0.2:
        return OrderKeys(shared=(rng.choice("ij"),))
    n = rng.randint(1, 4)
    return OrderKeys(items=tuple({(rng.choice("ij"), str(rng.randrange(8))) for _ in range(n)}))


def test_random_schedules_keep_order_never_overlap_conflicts_and_always_finish() -> None:
    for seed in range(200):
        rng = random.Random(seed)
        r = Run()
        keys: dict[int, OrderKeys] = {}
        running: set[int] = set()
        started_at: dict[int, int] = {}
        n_total = 60
        admitted = 0
        for step in range(10_000):
            if admitted < n_total and (not running or rng.random() < 0.5):
                keys[admitted] = random_keys(rng)
                r.admit(admitted, keys[admitted])
                admitted += 1
            else:
                r.release(rng.choice(sorted(running)))
            for n in r.ready[len(started_at) :]:
                started_at[n] = step
            running = {n for n in started_at if n in r.waiters}
            # no two conflicting copies are ever out at the same time
            out = sorted(running)
            for i, a in enumerate(out):
                for b in out[i + 1 :]:
                    assert not conflicts(keys[a], keys[b]), (seed, a, b)
            if admitted == n_total and not r.waiters:
                break
        assert admitted == n_total and not r.waiters, f"seed {seed}: stuck"
        # of two conflicting copies, the one admitted first became ready first
        for a in range(n_total):
            for b in range(a + 1, n_total):
                if conflicts(keys[a], keys[b]):
                    assert r.ready.index(a) < r.ready.index(b), (seed, a, b)
        assert r.scope.resources() == 0 and r.scope.pending == 0
