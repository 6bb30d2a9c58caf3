"""A migration's position as an explicit state machine, h11 style: named phases, transition
functions that return a new state or raise, and no I/O.

Phases:

- `running`: in stage `stage` (and weight step `step` of a flip); advances when the gates hold
  (by itself with `auto: true`, else when a person says so);
- `halted`: a rollback put it here (automatic after a failed flip step, or a person's); it
  applies the position it holds and waits for a person's `advance` to run again, so a backend
  that keeps failing is not flipped to again and again;
- `reverse`: past the last stage with `reverse_shadow`: the new backend serves everything and
  the old one is its shadow, for the rollback window;
- `done`: the new backend serves everything; nothing is shadowed back.

`settings()` is what a state means for the live routes (the migration layer of runtime control):
every instance derives it from the shared state, so they agree without sending it around.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from shadowlane.config import Config, MigrationConfig
from shadowlane.control import RuntimeState


class Phase(StrEnum):
    RUNNING = "running"
    HALTED = "halted"
    REVERSE = "reverse"
    DONE = "done"


class TransitionError(Exception):
    """A transition that does not apply to the state (advance when done, rollback forward)."""


@dataclass(frozen=True, slots=True)
class Outline:
    """What the state machine needs of a plan: stage names and each flip's steps. Kept in the
    shared state too, so the CLI can move a migration with only the store at hand."""

    stages: tuple[str, ...]
    steps: tuple[tuple[int, ...] | None, ...]
    reverse: bool

    @classmethod
    def of(cls, mig: MigrationConfig) -> Outline:
        return cls(
            tuple(s.name for s in mig.stages),
            tuple(tuple(s.weights) if s.weights is not None else None for s in mig.stages),
            mig.reverse_shadow is not None,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "stages": list(self.stages),
            "steps": [list(s) if s is not None else None for s in self.steps],
            "reverse": self.reverse,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Outline:
        return cls(
            tuple(str(s) for s in raw["stages"]),
            tuple(tuple(int(w) for w in s) if s is not None else None for s in raw["steps"]),
            bool(raw["reverse"]),
        )

    def index(self, name: str) -> int:
        try:
            return self.stages.index(name)
        except ValueError:
            raise TransitionError(f"no stage {name!r} (stages: {', '.join(self.stages)})") from None


@dataclass(frozen=True, slots=True)
class MigrationState:
    stage: int = 0
    #: weight step in a flip stage (0 elsewhere; -1: rolled back before its first step)
    step: int = 0
    phase: Phase = Phase.RUNNING
    #: when the stage, and the step, began (wall clock, shared by the fleet)
    entered: float = 0.0
    step_entered: float = 0.0
    #: comparison counts at the stage's start: route -> [compared, differing, {field: raw}]
    baseline: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "step": self.step,
            "phase": self.phase.value,
            "entered": self.entered,
            "step_entered": self.step_entered,
            "baseline": self.baseline,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> MigrationState:
        return cls(
            int(raw["stage"]),
            int(raw["step"]),
            Phase(raw["phase"]),
            float(raw["entered"]),
            float(raw["step_entered"]),
            dict(raw.get("baseline") or {}),
        )


def position(st: MigrationState, plan: Outline) -> str:
    """A person's name for where it is: `reads`, `flip@10%`, `reverse`, `done`."""
    if st.phase in (Phase.REVERSE, Phase.DONE):
        return str(st.phase.value)
    steps = plan.steps[st.stage]
    name = plan.stages[st.stage]
    if steps is None:
        return name
    return f"{name}@{steps[st.step] if st.step >= 0 else 0}%"


def start(now: float, baseline: dict[str, Any]) -> MigrationState:
    return MigrationState(0, 0, Phase.RUNNING, now, now, baseline)


def _enter(stage: int, step: int, now: float, baseline: dict[str, Any]) -> MigrationState:
    return MigrationState(stage, step, Phase.RUNNING, now, now, baseline)


def advance(
    st: MigrationState, plan: Outline, now: float, baseline: dict[str, Any]
) -> MigrationState:
    """The next position: the next weight step, the next stage, then reverse or done.
    `baseline` is the comparison counts now, the start of a new stage's window."""
    if st.phase is Phase.DONE:
        raise TransitionError("the migration is done")
    if st.phase is Phase.REVERSE:
        return replace(st, phase=Phase.DONE, entered=now, step_entered=now)
    steps = plan.steps[st.stage]
    if steps is not None and st.step + 1 < len(steps):
        return replace(st, step=st.step + 1, phase=Phase.RUNNING, step_entered=now)
    if st.stage + 1 < len(plan.stages):
        return _enter(st.stage + 1, 0, now, baseline)
    final = Phase.REVERSE if plan.reverse else Phase.DONE
    return replace(st, phase=final, entered=now, step_entered=now)


def _last_step(plan: Outline, stage: int) -> int:
    steps = plan.steps[stage]
    return len(steps) - 1 if steps is not None else 0


def rollback(
    st: MigrationState,
    plan: Outline,
    now: float,
    baseline: dict[str, Any],
    to: str | None = None,
) -> MigrationState:
    """Back to stage `to` (its first step), or one position back: the previous weight step,
    else the previous stage (its last step). Always `halted` afterwards."""
    if to is not None:
        target = plan.index(to)
        done_or_reverse = st.phase in (Phase.REVERSE, Phase.DONE)
        if target > st.stage or (target == st.stage and not done_or_reverse and st.step == 0):
            raise TransitionError(
                f"stage {to!r} is not before {position(st, plan)}: rollback goes back only"
            )
        return replace(_enter(target, 0, now, baseline), phase=Phase.HALTED)
    if st.phase in (Phase.REVERSE, Phase.DONE):
        last = len(plan.stages) - 1
        return replace(_enter(last, _last_step(plan, last), now, baseline), phase=Phase.HALTED)
    if plan.steps[st.stage] is not None and st.step >= 0:
        # the last good step; before the first one, the flip's weight 0 (step -1)
        return replace(st, step=st.step - 1, phase=Phase.HALTED, step_entered=now)
    if st.stage == 0:
        raise TransitionError(f"{position(st, plan)} is the first stage: nothing to go back to")
    prev = st.stage - 1
    return replace(_enter(prev, _last_step(plan, prev), now, baseline), phase=Phase.HALTED)


def resume(st: MigrationState, now: float) -> MigrationState:
    """A person's advance of a halted migration first runs it again where it stands (the
    step's window starts anew, so the figures that halted it are not judged again)."""
    if st.phase is not Phase.HALTED:
        raise TransitionError(f"not halted but {st.phase.value}")
    return replace(st, phase=Phase.RUNNING, step_entered=now)


# ---------------------------------------------------------------------------------------------
# what a state means for the routes


def flip_weight(st: MigrationState, plan: Outline) -> int:
    """The new backend's share (percent) of the flip routes' primary traffic."""
    if st.phase in (Phase.REVERSE, Phase.DONE):
        return 100 if any(s is not None for s in plan.steps) else 0
    weight = 0
    for i, steps in enumerate(plan.steps[: st.stage + 1]):
        if steps is not None:
            if i < st.stage:
                weight = steps[-1]
            elif st.step >= 0:
                weight = steps[st.step]
    return weight


def settings(st: MigrationState, mig: MigrationConfig, cfg: Config) -> RuntimeState:
    """The migration layer of runtime control for this state."""
    out = RuntimeState()
    plan = Outline.of(mig)
    last = len(mig.stages) - 1 if st.phase in (Phase.REVERSE, Phase.DONE) else st.stage
    for stage in mig.stages[: last + 1]:
        if stage.shadow is not None:
            for route in stage.shadow.routes:
                out.percent[f"{route}/{mig.new}"] = stage.shadow.percent
                out.paused[f"{route}/{mig.new}"] = False
    weight = flip_weight(st, plan)
    flips = mig.flip_routes(cfg)
    by_name = {rc.name: rc for rc in cfg.routes}
    for route in flips:
        if weight > 0:
            legs = by_name[route].backend_names
            ws = {b: 0 for b in legs}
            ws[mig.old], ws[mig.new] = 100 - weight, weight
            out.weights[route] = ws
        has_forward = any(s.backend == mig.new for s in by_name[route].shadows)
        if weight >= 100 and has_forward:
            # the new backend answers everything: a copy to it would compare it with itself
            out.paused[f"{route}/{mig.new}"] = True
        if mig.reverse_shadow is not None:
            key = f"{route}/{mig.old}"
            reverse_on = st.phase is Phase.REVERSE
            out.percent[key] = mig.reverse_shadow.percent if reverse_on else 0.0
            out.paused[key] = not reverse_on
    return out
