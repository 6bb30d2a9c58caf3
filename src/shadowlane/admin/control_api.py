"""The runtime control API, served by the admin listener next to the comparison API.

`install_control_api(admin, control, reload)` adds:

- `GET /api/config`: the effective config (the file's, with runtime changes shown and listed),
- `PUT /api/routes/{route}/weights`, `PUT /api/routes/{route}/shadows/{target}/percent`,
  `POST .../pause`, `POST .../resume` and `POST /api/reload`, each needing the admin token.

Only the HTTP part lives here: parsing bodies, mapping a refused change to its status. What a
change does, and how it reaches every worker, is `shadowlane.control`'s; this module sees it
through `RuntimeControl`, so the admin layer depends on neither the assembly nor the lanes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from shadowlane.admin.app import AdminApp
from shadowlane.admin.messages import (
    AdminRequest,
    AdminResponse,
    Handler,
    error_response,
    json_response,
)
from shadowlane.control import ControlError

__all__ = ["RuntimeControl", "install_control_api"]

#: reload the config file; the problems found (empty when it was swapped in)
Reload = Callable[[], list[str]]


class RuntimeControl(Protocol):
    """The operations the API calls; each validates its input and raises `ControlError`."""

    def snapshot(self) -> dict[str, Any]: ...

    def set_weights(self, route_name: str, weights: object) -> dict[str, int]: ...

    def set_percent(self, route: str, target: str, percent: object) -> float: ...

    def set_paused(self, route: str, target: str, paused: bool) -> None: ...


def _body(req: AdminRequest) -> dict[str, Any]:
    try:
        data = req.json()
    except ValueError:
        raise ControlError(400, "body must be JSON") from None
    if not isinstance(data, dict):
        raise ControlError(400, "body must be a JSON object")
    return data


def _guarded(fn: Callable[[AdminRequest], dict[str, Any]]) -> Handler:
    """A refused change answers its status with `{"error": ...}`; anything else stays a 500."""

    async def handler(req: AdminRequest) -> AdminResponse:
        try:
            return json_response(fn(req))
        except ControlError as err:
            return error_response(err.status, str(err))

    return handler


def install_control_api(
    admin: AdminApp, control: RuntimeControl, reload: Reload | None = None
) -> None:
    """GET /api/config; mutating (bearer token): weights, percent, pause, resume, reload.

    Without `reload`, `POST /api/reload` is not served (there is no file to reload).
    """

    async def get_config(_req: AdminRequest) -> AdminResponse:
        return json_response(control.snapshot())

    def weights(req: AdminRequest) -> dict[str, Any]:
        route = req.params["route"]
        return {"route": route, "weights": control.set_weights(route, _body(req).get("weights"))}

    def percent(req: AdminRequest) -> dict[str, Any]:
        route, target = req.params["route"], req.params["target"]
        value = control.set_percent(route, target, _body(req).get("percent"))
        return {"route": route, "target": target, "percent": value}

    def pause(req: AdminRequest) -> dict[str, Any]:
        route, target = req.params["route"], req.params["target"]
        control.set_paused(route, target, True)
        return {"route": route, "target": target, "paused": True}

    def resume(req: AdminRequest) -> dict[str, Any]:
        route, target = req.params["route"], req.params["target"]
        control.set_paused(route, target, False)
        return {"route": route, "target": target, "paused": False}

    admin.route("GET", "/api/config", get_config)
    admin.route("PUT", "/api/routes/{route}/weights", _guarded(weights), mutating=True)
    shadow = "/api/routes/{route}/shadows/{target}"
    admin.route("PUT", shadow + "/percent", _guarded(percent), mutating=True)
    admin.route("POST", shadow + "/pause", _guarded(pause), mutating=True)
    admin.route("POST", shadow + "/resume", _guarded(resume), mutating=True)
    if reload is not None:

        def do_reload(_req: AdminRequest) -> dict[str, Any]:
            errors = reload()
            if errors:
                raise ControlError(422, "reload refused: " + "; ".join(errors))
            return {"reloaded": True}

        admin.route("POST", "/api/reload", _guarded(do_reload), mutating=True)
