"""Migrations as a plan: stages, gates, the flip, rollback, one state for the fleet.

`gates` judges measured values (pure), `state` is the position as a state machine (pure) and
what it means for the routes, `figures` measures (store and metrics), `shared` keeps the state
in the store and moves it (compare-and-set, audited), and `runtime` runs in an instance:
it follows the shared state through runtime control and drives while it holds the lease.

Layer: reads store and metrics, acts through control; app wires it, cli calls `shared`.
"""

from shadowlane.migrate.gates import (
    BackendFigures,
    GateResult,
    Measured,
    RouteFigures,
    blocking,
    evaluate,
    rollback_worthy,
)
from shadowlane.migrate.runtime import MigrationRuntime, describe
from shadowlane.migrate.shared import (
    Shared,
    advance_op,
    gates_doc,
    load,
    load_all,
    rollback_op,
    transition,
)
from shadowlane.migrate.state import (
    MigrationState,
    Outline,
    Phase,
    TransitionError,
    advance,
    position,
    resume,
    rollback,
    settings,
)

__all__ = [
    "BackendFigures",
    "GateResult",
    "Measured",
    "MigrationRuntime",
    "MigrationState",
    "Outline",
    "Phase",
    "RouteFigures",
    "Shared",
    "TransitionError",
    "advance",
    "advance_op",
    "blocking",
    "describe",
    "evaluate",
    "gates_doc",
    "load",
    "load_all",
    "position",
    "resume",
    "rollback",
    "rollback_op",
    "rollback_worthy",
    "settings",
    "transition",
]
