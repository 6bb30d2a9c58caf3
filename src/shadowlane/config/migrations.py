"""The `migrations:` section: a migration as a plan of stages, each with the gates that must
hold before the next one.

A migration names its old and new backend and the routes it covers. A stage either turns
shadows to the new backend on (or changes their percent) on some routes (`shadow:`), or moves
the primary's weight from old to new in steps (`weights: [1, 10, 50, 100]`, the new backend's
share in percent at each step). `gates` say what must hold before the plan moves on; rates are
percentages like every percent in the file (`max_diff_rate: 0.5%` and `0.5` mean the same).
References between sections (backends, routes, shadows to the new backend, legs on the routes
being flipped) are checked by `check_migrations`, called from the loader's whole-tree pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal, Protocol

from pydantic import BeforeValidator, Field, field_validator, model_validator

from shadowlane.config.backends import BackendConfig
from shadowlane.config.base import _Model, _none_to_empty
from shadowlane.config.routes import RouteConfig
from shadowlane.config.sampling import Percent
from shadowlane.config.units import Duration, Name


class Config(Protocol):
    """The parts of the whole file these rules read (the root model imports this module)."""

    @property
    def backends(self) -> Mapping[str, BackendConfig]: ...

    @property
    def routes(self) -> Sequence[RouteConfig]: ...

    @property
    def migrations(self) -> Sequence[MigrationConfig]: ...


class StageShadow(_Model, frozen=True):
    """Shadows to the migration's new backend on `routes`, at `percent` (0 turns them off)."""

    routes: Annotated[list[Name], Field(min_length=1)]
    percent: Percent = 100.0


class StageGates(_Model, frozen=True):
    """What must hold before the next stage (or the next weight step of a flip).

    Every figure is counted from the moment the stage (or step) began, fleet-wide where the
    store has it (comparisons, ledger), and on the driving instance for the flip's request
    figures (see docs/migrations.md).
    """

    #: time in the stage
    min_time: Duration = 0.0
    #: comparisons on the stage's routes since the stage began (each route)
    min_compared: Annotated[int, Field(ge=0)] = 0
    #: share of compared requests with a reported difference, per route
    max_diff_rate: Percent | None = None
    #: field paths that must not differ in a single comparison
    never_differ: list[str] = Field(default_factory=list)
    #: no open divergence ledger entry for the new backend
    ledger_empty: bool = False
    #: `verify` finds both clusters equal (needs the migration's `verify:`)
    verify_equal: bool = False
    #: time in each weight step of a flip
    step_time: Duration = 0.0
    #: the new backend's share of 5xx answers (and proxy 502/504) in the step
    max_error_rate: Percent | None = None
    #: the new backend's p99 over the old one's, in the same window
    max_p99_ratio: Annotated[float, Field(gt=0)] | None = None
    #: requests the new backend must have answered in a step before its error rate and p99
    #: are judged (a rate of 1 in 2 says nothing)
    min_requests: Annotated[int, Field(ge=1)] = 10


class StageConfig(_Model, frozen=True):
    """One stage: a shadow change or a flip, and its gates."""

    name: Name
    shadow: StageShadow | None = None
    weights: Annotated[list[int], Field(min_length=1)] | None = None
    gates: Annotated[StageGates, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=StageGates
    )

    @field_validator("weights")
    @classmethod
    def _steps_rise_to_100(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(not 1 <= w <= 100 for w in value):
            raise ValueError("each step must be 1..100 (the new backend's share in percent)")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("steps must rise strictly, e.g. [1, 10, 50, 100]")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> StageConfig:
        if self.shadow is not None and self.weights is not None:
            raise ValueError("a stage sets shadow or weights, not both")
        return self

    @property
    def is_flip(self) -> bool:
        return self.weights is not None


class ReverseShadow(_Model, frozen=True):
    """After 100%: the old backend becomes the shadow of the new one for `window`, so a
    rollback finds it fed and compared. The routes need a shadow to the old backend."""

    window: Duration
    percent: Percent = 100.0


class MigrationVerify(_Model, frozen=True):
    """How `verify_equal` runs `verify`: the clusters are the backends' first endpoints."""

    kind: Literal["elasticsearch", "opensearch"] = "elasticsearch"
    indices: list[str] = Field(default_factory=list)
    #: at most one run per this long (a run reads every document)
    interval: Duration = 30.0
    timeout: Duration = 30.0


class MigrationConfig(_Model, frozen=True):
    """One migration: old -> new over `routes`, through `stages` in order."""

    name: Name
    old: Name
    new: Name
    #: advance by itself when every gate of the stage holds
    auto: bool = False
    #: routes it covers; default: every route with a shadow to `new` or a leg on it
    routes: list[Name] | None = None
    stages: Annotated[list[StageConfig], Field(min_length=1)]
    reverse_shadow: ReverseShadow | None = None
    verify: MigrationVerify | None = None
    #: how often the driving instance evaluates the gates
    interval: Annotated[Duration, Field(gt=0)] = 5.0

    @model_validator(mode="after")
    def _names(self) -> MigrationConfig:
        if self.old == self.new:
            raise ValueError("old and new must be different backends")
        seen: set[str] = set()
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stage name {stage.name!r} used twice")
            seen.add(stage.name)
        return self

    def covered_routes(self, cfg: Config) -> list[str]:
        """The routes this migration covers, in config order."""
        if self.routes is not None:
            return list(self.routes)
        out = []
        for rc in cfg.routes:
            if self.new in rc.backend_names or any(s.backend == self.new for s in rc.shadows):
                out.append(rc.name)
        return out

    def flip_routes(self, cfg: Config) -> list[str]:
        """The covered routes whose primary legs list both backends: where weights move."""
        by_name = {rc.name: rc for rc in cfg.routes}
        return [
            name
            for name in self.covered_routes(cfg)
            if name in by_name and {self.old, self.new} <= set(by_name[name].backend_names)
        ]


def check_migrations(cfg: Config) -> list[str]:
    """Whole-tree rules of `migrations:` (one `key.path: reason` line each)."""
    errors: list[str] = []
    routes = {rc.name: rc for rc in cfg.routes}
    seen: dict[str, int] = {}
    for i, mig in enumerate(cfg.migrations):
        at = f"migrations[{i}]"
        if mig.name in seen:
            errors.append(f"{at}.name: duplicate migration name {mig.name!r}")
        seen[mig.name] = i
        for key, name in (("old", mig.old), ("new", mig.new)):
            if name not in cfg.backends:
                errors.append(
                    f"{at}.{key}: unknown backend {name!r} (known: {', '.join(cfg.backends)})"
                )
        for j, name in enumerate(mig.routes or ()):
            if name not in routes:
                errors.append(f"{at}.routes[{j}]: unknown route {name!r}")
        covered = set(mig.covered_routes(cfg))
        for j, stage in enumerate(mig.stages):
            sat = f"{at}.stages[{j}]"
            if stage.shadow is not None:
                for k, name in enumerate(stage.shadow.routes):
                    rc = routes.get(name)
                    if rc is None:
                        errors.append(f"{sat}.shadow.routes[{k}]: unknown route {name!r}")
                    elif not any(s.backend == mig.new for s in rc.shadows):
                        errors.append(
                            f"{sat}.shadow.routes[{k}]: route {name!r} has no shadow to "
                            f"{mig.new!r} (declare it under the route, percent: 0)"
                        )
                    elif name not in covered:
                        errors.append(
                            f"{sat}.shadow.routes[{k}]: route {name!r} is not one "
                            f"of the migration's routes"
                        )
            if stage.is_flip and not mig.flip_routes(cfg):
                errors.append(
                    f"{sat}.weights: no route of the migration lists both {mig.old!r} and "
                    f"{mig.new!r} under backends (the legs whose weights move)"
                )
            if stage.gates.verify_equal and mig.verify is None:
                errors.append(f"{sat}.gates.verify_equal: needs {at}.verify (kind, indices)")
        if mig.reverse_shadow is not None:
            for name in mig.flip_routes(cfg):
                if not any(s.backend == mig.old for s in routes[name].shadows):
                    errors.append(
                        f"{at}.reverse_shadow: route {name!r} has no shadow to {mig.old!r} "
                        "(declare it under the route, percent: 0)"
                    )
        for key, name in (("old", mig.old), ("new", mig.new)):
            backend = cfg.backends.get(name)
            if mig.verify is not None and backend is not None and not backend.endpoints:
                errors.append(f"{at}.{key}: backend {name!r} has no endpoint to verify")
    return errors
