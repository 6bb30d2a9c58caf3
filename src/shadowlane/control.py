"""Runtime control: shadow percent, pause/resume, route weights, without a restart.

Changes live in memory only (a `RuntimeState`) and in the live objects they steer (samplers,
lanes, balancers), never in the config file or its models: a reload (SIGHUP) or a restart goes
back to what the file says, and `snapshot()` shows the effective config by overlaying the live
values on the file's. With `--workers N` the
admin listener runs in worker 0, which writes the whole state to a small JSON file in the
workers' shared directory; every worker polls that file (a `stat` every 250 ms) and applies a
new version, so a change reaches all workers within about a quarter of a second.

Two layers of overrides, applied in this order over the file's values: the migration plan's
(`set_plan`: what the current stage of each migration sets, derived by every instance from the
shared migration state) and a person's (`state`: the admin API's calls, shared through the store
with a fleet, `set_manual`). A person's override of a key wins until the next migration
transition, which clears it (the driver rewrites the shared document). A key neither layer holds
any more goes back to the file's value.

The HTTP face of these operations is `shadowlane.admin.control_api`; this module knows nothing
of HTTP beyond the status a refused change maps to, so other callers (a migration acting
through control) use the same validated operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

if TYPE_CHECKING:
    from shadowlane.config import Config
    from shadowlane.routing import RouteTable
    from shadowlane.shadow.dispatcher import LanePlan, ShadowDispatcher

POLL_SECONDS = 0.25


@dataclass
class RuntimeState:
    """Overrides on top of the file: what the admin API changed since the last (re)load."""

    version: int = 0
    weights: dict[str, dict[str, int]] = field(default_factory=dict)
    #: "route/target" -> percent
    percent: dict[str, float] = field(default_factory=dict)
    #: "route/target" -> paused
    paused: dict[str, bool] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "weights": self.weights,
            "percent": self.percent,
            "paused": self.paused,
        }

    def copy(self) -> RuntimeState:
        return RuntimeState(
            self.version,
            {r: dict(w) for r, w in self.weights.items()},
            dict(self.percent),
            dict(self.paused),
        )

    def empty(self) -> bool:
        return not (self.weights or self.percent or self.paused)

    def without(self, other: RuntimeState) -> RuntimeState:
        """These overrides minus the keys `other` sets (a transition clears what it sets)."""
        return RuntimeState(
            self.version,
            {r: w for r, w in self.weights.items() if r not in other.weights},
            {k: v for k, v in self.percent.items() if k not in other.percent},
            {k: v for k, v in self.paused.items() if k not in other.paused},
        )

    @classmethod
    def from_json(cls, data: bytes) -> RuntimeState:
        raw = orjson.loads(data)
        return cls(
            version=int(raw["version"]),
            weights={r: {b: int(w) for b, w in ws.items()} for r, ws in raw["weights"].items()},
            percent={k: float(v) for k, v in raw["percent"].items()},
            paused={k: bool(v) for k, v in raw["paused"].items()},
        )


class LiveGeneration(Protocol):
    """What control acts on: the config, routes and shadow lanes serving now. Asked for on
    every operation, never kept, because a reload swaps in another one."""

    @property
    def cfg(self) -> Config: ...

    @property
    def routes(self) -> RouteTable: ...

    @property
    def shadow(self) -> ShadowDispatcher: ...


Live = Callable[[], LiveGeneration]


def _lane_plans(dispatcher: ShadowDispatcher, route: str, target: str) -> list[LanePlan]:
    """The shadow plans of `route` that copy to `target` (none when either is unknown)."""
    shadows = dispatcher.plans.get(route)
    return [p for p in shadows.lanes if p.lane.target == target] if shadows else []


def _set_percent(plans: list[LanePlan], percent: float) -> None:
    for p in plans:
        p.sampler.set_percent(percent)


def _set_paused(plans: list[LanePlan], paused: bool) -> None:
    for p in plans:
        if paused:
            p.lane.pause()
        else:
            p.lane.resume()


def _split(key: str) -> tuple[str, str]:
    route, _, target = key.partition("/")
    return route, target


class ControlError(Exception):
    """A refused change; `status` is the HTTP status the control API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Control:
    """Applies runtime overrides to the live routes and shadow lanes of one worker."""

    def __init__(self, live: Live, state_path: str | None, writer: bool) -> None:
        self._live = live
        #: a person's overrides (the admin API, or the fleet's shared copy of them)
        self.state = RuntimeState()
        #: the migrations' stages' settings, under the person's overrides
        self.plan = RuntimeState()
        #: the file's values of every key a layer changed in this generation, to go back to
        self._file_weights: dict[str, dict[str, int]] = {}
        self._file_percent: dict[str, float] = {}
        self._file_paused: dict[str, bool] = {}
        #: told of each change a person made here (the fleet pushes it to the store)
        self.on_manual_change: Callable[[RuntimeState], None] | None = None
        #: told after a reload reset the overrides (the fleet applies the shared ones again)
        self.on_reset: Callable[[], None] | None = None
        #: shared file for several workers; None for a single process
        self.state_path = state_path
        self.writer = writer
        self._seen_mtime = 0
        self._poller: asyncio.Task[None] | None = None

    # ----- the operations (validated, then applied and published) -----
    def set_weights(self, route_name: str, weights: object) -> dict[str, int]:
        route = self._live().routes.get(route_name)
        if route is None:
            raise ControlError(404, f"no route {route_name!r}")
        if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in weights.items()
        ):
            raise ControlError(400, 'body must be {"weights": {"<backend>": <int>, ...}}')
        before = route.weights()
        try:
            route.set_weights(weights)
        except ValueError as err:
            raise ControlError(400, str(err)) from None
        self._file_weights.setdefault(route_name, before)
        self.state.weights[route_name] = route.weights()
        self._publish()
        self._manual_changed()
        return route.weights()

    def set_percent(self, route: str, target: str, percent: object) -> float:
        if (
            not isinstance(percent, int | float)
            or isinstance(percent, bool)
            or not math.isfinite(percent)
            or not 0 <= percent <= 100
        ):
            raise ControlError(400, "percent must be a number in 0..100")
        plans = self._plans(route, target)
        self._file_percent.setdefault(f"{route}/{target}", plans[0].sampler.percent)
        _set_percent(plans, float(percent))
        self.state.percent[f"{route}/{target}"] = float(percent)
        self._publish()
        self._manual_changed()
        return float(percent)

    def set_paused(self, route: str, target: str, paused: bool) -> None:
        plans = self._plans(route, target)
        self._file_paused.setdefault(f"{route}/{target}", plans[0].lane.paused)
        _set_paused(plans, paused)
        self.state.paused[f"{route}/{target}"] = paused
        self._publish()
        self._manual_changed()

    def _manual_changed(self) -> None:
        if self.on_manual_change is not None:
            self.on_manual_change(self.state.copy())

    # ----- the layers (migration plan, the fleet's copy of a person's overrides) -----
    def set_plan(self, plan: RuntimeState) -> None:
        """Replace the migration layer (a stage changed somewhere in the fleet) and apply."""
        self.plan = plan.copy()
        self._reapply()

    def set_manual(self, manual: RuntimeState) -> None:
        """Replace a person's overrides with the fleet's shared copy of them, and apply."""
        version = self.state.version
        self.state = manual.copy()
        self.state.version = version
        self._reapply()

    def effective(self) -> RuntimeState:
        """Both layers merged (a person's on top), plus the file's value for every key a
        layer changed and neither holds now: what a worker must apply to match."""
        out = RuntimeState(self.state.version)
        out.weights.update(self._file_weights)
        out.percent.update(self._file_percent)
        out.paused.update(self._file_paused)
        for layer in (self.plan, self.state):
            out.weights.update(layer.weights)
            out.percent.update(layer.percent)
            out.paused.update(layer.paused)
        return out

    def _reapply(self) -> None:
        live = self._live()
        routes, dispatcher = live.routes, live.shadow
        for layer in (self.plan, self.state):  # remember the file's values before changing
            for name in layer.weights:
                route = routes.get(name)
                if route is not None:
                    self._file_weights.setdefault(name, route.weights())
            for key in layer.percent:
                plans = _lane_plans(dispatcher, *_split(key))
                if plans:
                    self._file_percent.setdefault(key, plans[0].sampler.percent)
            for key in layer.paused:
                plans = _lane_plans(dispatcher, *_split(key))
                if plans:
                    self._file_paused.setdefault(key, plans[0].lane.paused)
        self._apply_values(self.effective())
        self._publish()

    def _plans(self, route: str, target: str) -> list[LanePlan]:
        live = self._live()
        if live.routes.get(route) is None:
            raise ControlError(404, f"no route {route!r}")
        plans = _lane_plans(live.shadow, route, target)
        if not plans:
            raise ControlError(404, f"route {route!r} has no shadow to {target!r}")
        return plans

    # ----- views -----
    def snapshot(self) -> dict[str, Any]:
        """The effective config: the file's, with runtime changes applied and marked."""
        live = self._live()
        cfg, routes = live.cfg, live.routes
        out: dict[str, Any] = cfg.model_dump(mode="json", warnings=False, by_alias=True)
        for name, backend in cfg.backends.items():  # endpoints as the URLs users wrote
            out["backends"][name]["endpoints"] = [ep.url for ep in backend.endpoints]
        for rc in out["routes"]:
            route = routes.get(rc["name"])
            if route is not None:
                weights = route.weights()
                if len(weights) > 1:
                    rc["weights"] = weights
                for leg in rc.get("backends") or ():  # the legs as they split traffic now
                    leg["weight"] = weights.get(leg["backend"], 0)
            shadows = live.shadow.plans.get(rc["name"])
            for sc, plan in zip(rc["shadows"], shadows.lanes if shadows else [], strict=False):
                sc["percent"] = plan.sampler.percent
                sc["paused"] = plan.lane.paused
        out["runtime"] = {
            "version": self.state.version,
            "weights": self.state.weights,
            "percent": self.state.percent,
            "paused": self.state.paused,
            "migration": self.plan.as_dict(),
            "persisted": False,
            "note": "runtime changes are not written to the config file; a reload or restart "
            "goes back to the file",
        }
        return out

    # ----- reload and several workers -----
    def reset(self) -> None:
        """After a reload: a person's overrides are forgotten everywhere (the file's values
        win); the migration layer is the fleet's state, not the file's, so it is applied again
        on the new generation, and so are a fleet's shared overrides (`on_reset`)."""
        self.state = RuntimeState(version=self.state.version + 1)
        self._file_weights.clear()
        self._file_percent.clear()
        self._file_paused.clear()
        if self.plan.empty():
            self._publish(bump=False)
        else:
            self._reapply()
        if self.on_reset is not None:
            self.on_reset()

    def apply(self, state: RuntimeState) -> None:
        """Apply a state published by worker 0 (unknown names are skipped: configs may differ
        for a moment during a reload)."""
        self._apply_values(state)
        self.state = state

    def _apply_values(self, state: RuntimeState) -> None:
        live = self._live()
        routes, dispatcher = live.routes, live.shadow
        for name, weights in state.weights.items():
            route = routes.get(name)
            if route is not None and route.weights() != weights:
                with contextlib.suppress(ValueError):
                    route.set_weights(weights)
        for key, value in state.percent.items():
            _set_percent(_lane_plans(dispatcher, *_split(key)), value)
        for key, paused in state.paused.items():
            _set_paused(_lane_plans(dispatcher, *_split(key)), paused)

    def _publish(self, bump: bool = True) -> None:
        if bump:
            self.state.version += 1
        if self.state_path is None or not self.writer:
            return
        published = self.effective()
        tmp = f"{self.state_path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(published.to_json())
        os.replace(tmp, self.state_path)  # atomic: readers see the old or the new file

    def start_polling(self) -> None:
        if self.state_path is not None and not self.writer:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        assert self.state_path is not None
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                st = os.stat(self.state_path)
            except FileNotFoundError:
                continue
            if st.st_mtime_ns == self._seen_mtime:
                continue
            self._seen_mtime = st.st_mtime_ns
            try:
                with open(self.state_path, "rb") as f:
                    state = RuntimeState.from_json(f.read())
            except (OSError, ValueError, KeyError):
                continue
            if state.version != self.state.version:
                self.apply(state)

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
