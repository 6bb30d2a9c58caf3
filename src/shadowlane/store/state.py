"""Shared state (schema 3): named state documents, the audit log, and leases.

Why documents with a version and not columns: what is shared (the runtime control overrides,
each migration's position and its baselines) is small, read whole and written whole, and its
shape belongs to the layer that owns it (control, migrate), not to the store. Each row carries
a version that every write raises by one; a write may name the version it read
(compare-and-set), so two instances that change the same document at the same moment cannot
both win silently. Instances poll the versions (one tiny query) to see a change made anywhere.

The audit log is append-only: one row per migration transition (when, from which stage to
which, who or `auto`, why, and the gate figures that justified it).

A lease is one row per name holding an owner and an expiry: the instance that holds it (and
renews it before it expires) is the one that drives a migration; the others only apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class StateRow(NamedTuple):
    """One shared document: its name, version, JSON text and when it was last written."""

    name: str
    version: int
    data: str
    updated: float


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One transition of a migration, as the audit log keeps it."""

    ts: float
    migration: str
    from_stage: str
    to_stage: str
    #: `auto`, or who asked (the admin API's caller, `cli`)
    actor: str
    #: advance, rollback, auto-rollback, start, ...
    action: str
    reason: str = ""
    #: the gate figures at the moment (JSON-able)
    gates: tuple[dict[str, Any], ...] = ()
    id: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "migration": self.migration,
            "from": self.from_stage,
            "to": self.to_stage,
            "actor": self.actor,
            "action": self.action,
            "reason": self.reason,
            "gates": list(self.gates),
        }


def state_schema(id_column: str) -> list[str]:
    """The shared state's tables (schema 3)."""
    return [
        """CREATE TABLE IF NOT EXISTS shadowlane_state (
            name TEXT PRIMARY KEY, version BIGINT NOT NULL, data TEXT NOT NULL,
            updated DOUBLE PRECISION NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS shadowlane_audit (
            id {id_column},
            ts DOUBLE PRECISION NOT NULL, migration TEXT NOT NULL,
            from_stage TEXT NOT NULL, to_stage TEXT NOT NULL,
            actor TEXT NOT NULL, action TEXT NOT NULL, reason TEXT NOT NULL,
            gates TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS shadowlane_audit_migration ON shadowlane_audit (migration, ts)",
        """CREATE TABLE IF NOT EXISTS shadowlane_lease (
            name TEXT PRIMARY KEY, holder TEXT NOT NULL,
            expires DOUBLE PRECISION NOT NULL)""",
    ]
