"""A migration's shared document in the store, and the transitions that rewrite it.

One document per migration (`migration:NAME`): the outline of its plan (stage names, flip
steps), the backends and routes it covers, and its `MigrationState`. The driving instance also
writes `gates:NAME`, the last gate evaluation, for `status` anywhere. `control` holds a person's
runtime overrides shared by the fleet.

`transition` is the one way a migration moves, whoever asks (the driver, the admin API, the
CLI on the store): read the document, apply a pure transition, write it back only if nobody
wrote it meanwhile (compare-and-set on its version; retried on a conflict), then append the
audit record and clear a person's overrides on the migration's routes (a transition sets what
the new position means; an override made for the old position must not outlive it).
Everything here blocks on the store: call it off the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from shadowlane.config import Config, MigrationConfig
from shadowlane.control import RuntimeState
from shadowlane.migrate.figures import comparison_counts
from shadowlane.migrate.state import (
    MigrationState,
    Outline,
    Phase,
    TransitionError,
    advance,
    position,
    resume,
    rollback,
    start,
)
from shadowlane.store import AuditRecord, Store

DOC = "migration:"
GATES = "gates:"
CONTROL = "control"

#: attempts of a transition that lost a compare-and-set race
ATTEMPTS = 5

Op = Callable[[MigrationState, Outline, float, dict[str, Any]], MigrationState]


@dataclass(frozen=True, slots=True)
class Shared:
    """A migration's shared document, as read (`version` is the store's)."""

    name: str
    old: str
    new: str
    routes: tuple[str, ...]
    outline: Outline
    state: MigrationState
    version: int = 0
    last: dict[str, Any] | None = None

    @property
    def position(self) -> str:
        return position(self.state, self.outline)

    @property
    def stage_name(self) -> str:
        return self.outline.stages[self.state.stage]

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "name": self.name,
                "old": self.old,
                "new": self.new,
                "routes": list(self.routes),
                "outline": self.outline.as_json(),
                "state": self.state.as_json(),
                "last": self.last,
            }
        ).decode()

    @classmethod
    def from_json(cls, data: str, version: int) -> Shared:
        raw = orjson.loads(data)
        return cls(
            str(raw["name"]),
            str(raw["old"]),
            str(raw["new"]),
            tuple(raw["routes"]),
            Outline.from_json(raw["outline"]),
            MigrationState.from_json(raw["state"]),
            version,
            raw.get("last"),
        )


def load_all(store: Store) -> dict[str, Shared]:
    return {
        row.name[len(DOC) :]: Shared.from_json(row.data, row.version)
        for row in store.read_states(DOC)
    }


def load(store: Store, name: str) -> Shared | None:
    for row in store.read_states(DOC + name):
        if row.name == DOC + name:
            return Shared.from_json(row.data, row.version)
    return None


def gates_doc(store: Store, name: str) -> dict[str, Any] | None:
    for row in store.read_states(GATES + name):
        if row.name == GATES + name:
            doc: dict[str, Any] = orjson.loads(row.data)
            return doc
    return None


def ensure(store: Store, mig: MigrationConfig, cfg: Config, now: float | None = None) -> Shared:
    """The migration's document, created at its first stage when the store has none, and
    its outline brought up to date when the config's plan changed (the position is kept when
    it still exists in the new plan, else the migration starts over, halted)."""
    when = time.time() if now is None else now
    outline = Outline.of(mig)
    routes = tuple(mig.covered_routes(cfg))
    for _ in range(ATTEMPTS):
        current = load(store, mig.name)
        if current is None:
            baseline = comparison_counts(store, routes, mig.new)
            doc = Shared(
                mig.name, mig.old, mig.new, routes, outline, start(when, baseline), 0, None
            )
            version = store.write_state(DOC + mig.name, doc.to_json(), expect=0)
            if version is not None:
                store.append_audit(AuditRecord(when, mig.name, "", doc.position, "config", "start"))
                return Shared(**{**_fields(doc), "version": version})
            continue
        if (current.outline, current.routes, current.old, current.new) == (
            outline,
            routes,
            mig.old,
            mig.new,
        ):
            return current
        st = current.state
        fits = st.stage < len(outline.stages) and (
            outline.stages[st.stage] == current.outline.stages[st.stage]
            and (outline.steps[st.stage] is None or st.step < len(outline.steps[st.stage] or ()))
        )
        if not fits:
            st = MigrationState(0, 0, Phase.HALTED, when, when, st.baseline)
        doc = Shared(mig.name, mig.old, mig.new, routes, outline, st, 0, current.last)
        version = store.write_state(DOC + mig.name, doc.to_json(), expect=current.version)
        if version is not None:
            return Shared(**{**_fields(doc), "version": version})
    raise TransitionError(f"migration {mig.name!r}: its document keeps changing; try again")


def _fields(doc: Shared) -> dict[str, Any]:
    return {f: getattr(doc, f) for f in Shared.__dataclass_fields__}


def transition(
    store: Store,
    name: str,
    op: Op,
    *,
    actor: str,
    action: str,
    reason: str = "",
    gates: list[dict[str, Any]] | None = None,
    now: float | None = None,
) -> tuple[Shared, Shared]:
    """Apply `op` to the stored state (compare-and-set), audit it; (before, after)."""
    for _ in range(ATTEMPTS):
        when = time.time() if now is None else now
        before = load(store, name)
        if before is None:
            raise TransitionError(f"no migration {name!r} in the store")
        baseline = comparison_counts(store, before.routes, before.new)
        state = op(before.state, before.outline, when, baseline)
        last = {"action": action, "actor": actor, "reason": reason, "ts": when}
        after = Shared(
            before.name,
            before.old,
            before.new,
            before.routes,
            before.outline,
            state,
            0,
            last,
        )
        version = store.write_state(DOC + name, after.to_json(), expect=before.version)
        if version is None:
            continue
        after = Shared(**{**_fields(after), "version": version})
        store.append_audit(
            AuditRecord(
                when,
                name,
                before.position,
                after.position,
                actor,
                action,
                reason,
                tuple(gates or ()),
            )
        )
        clear_overrides(store, before.routes)
        return before, after
    raise TransitionError(f"migration {name!r}: its document keeps changing; try again")


def overrides_without(state: RuntimeState, routes: tuple[str, ...]) -> RuntimeState:
    """A person's overrides minus those on `routes`."""
    on = set(routes)
    return RuntimeState(
        state.version,
        {r: w for r, w in state.weights.items() if r not in on},
        {k: v for k, v in state.percent.items() if k.partition("/")[0] not in on},
        {k: v for k, v in state.paused.items() if k.partition("/")[0] not in on},
    )


def clear_overrides(store: Store, routes: tuple[str, ...]) -> None:
    for row in store.read_states(CONTROL):
        if row.name != CONTROL:
            continue
        current = RuntimeState.from_json(row.data.encode())
        kept = overrides_without(current, routes)
        if kept.as_dict() != current.as_dict():
            store.write_state(CONTROL, kept.to_json().decode())


def advance_op(
    st: MigrationState, plan: Outline, now: float, base: dict[str, Any]
) -> MigrationState:
    return resume(st, now) if st.phase is Phase.HALTED else advance(st, plan, now, base)


def rollback_op(to: str | None) -> Op:
    def op(st: MigrationState, plan: Outline, now: float, base: dict[str, Any]) -> MigrationState:
        return rollback(st, plan, now, base, to)

    return op
