"""Runtime control: shadow percent, pause/resume, route weights, without a restart.

Changes live in memory only (a `RuntimeState`) and in the live objects they steer (samplers,
lanes, balancers), never in the config file or its models: a reload (SIGHUP) or a restart goes
back to what the file says, and `snapshot()` shows the effective config by overlaying the live
values on the file's. With `--workers N` the
admin listener runs in worker 0, which writes the whole state to a small JSON file in the
workers' shared directory; every worker polls that file (a `stat` every 250 ms) and applies a
new version, so a change reaches all workers within about a quarter of a second.

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
        return orjson.dumps(
            {
                "version": self.version,
                "weights": self.weights,
                "percent": self.percent,
                "paused": self.paused,
            }
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


class ControlError(Exception):
    """A refused change; `status` is the HTTP status the control API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Control:
    """Applies runtime overrides to the live routes and shadow lanes of one worker."""

    def __init__(self, live: Live, state_path: str | None, writer: bool) -> None:
        self._live = live
        self.state = RuntimeState()
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
        try:
            route.set_weights(weights)
        except ValueError as err:
            raise ControlError(400, str(err)) from None
        self.state.weights[route_name] = route.weights()
        self._publish()
        return route.weights()

    def set_percent(self, route: str, target: str, percent: object) -> float:
        if (
            not isinstance(percent, int | float)
            or isinstance(percent, bool)
            or not math.isfinite(percent)
            or not 0 <= percent <= 100
        ):
            raise ControlError(400, "percent must be a number in 0..100")
        _set_percent(self._plans(route, target), float(percent))
        self.state.percent[f"{route}/{target}"] = float(percent)
        self._publish()
        return float(percent)

    def set_paused(self, route: str, target: str, paused: bool) -> None:
        _set_paused(self._plans(route, target), paused)
        self.state.paused[f"{route}/{target}"] = paused
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
            "persisted": False,
            "note": "runtime changes are not written to the config file; a reload or restart "
            "goes back to the file",
        }
        return out

    # ----- reload and several workers -----
    def reset(self) -> None:
        """After a reload: the file's values win; the overrides are forgotten everywhere."""
        self.state = RuntimeState(version=self.state.version + 1)
        self._publish(bump=False)

    def apply(self, state: RuntimeState) -> None:
        """Apply a state published by worker 0 (unknown names are skipped: configs may differ
        for a moment during a reload)."""
        live = self._live()
        routes, dispatcher = live.routes, live.shadow
        for name, weights in state.weights.items():
            route = routes.get(name)
            if route is not None:
                with contextlib.suppress(ValueError):
                    route.set_weights(weights)
        for key, value in state.percent.items():
            route_name, _, target = key.partition("/")
            _set_percent(_lane_plans(dispatcher, route_name, target), value)
        for key, paused in state.paused.items():
            route_name, _, target = key.partition("/")
            _set_paused(_lane_plans(dispatcher, route_name, target), paused)
        self.state = state

    def _publish(self, bump: bool = True) -> None:
        if bump:
            self.state.version += 1
        if self.state_path is None or not self.writer:
            return
        tmp = f"{self.state_path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(self.state.to_json())
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
