"""Runtime control in process: a change steers the live generation, never the config models,
and the admin API maps refused changes to their statuses.

The end-to-end behaviour (every worker, reload forgets) is test_control_api.py's; these pin
the seams: `Control` acts on whatever `Generation` serves now, `GET /api/config` is the file's
config with the live values overlaid, and `admin.control_api` needs nothing but the
`RuntimeControl` operations.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from shadowlane.admin import AdminApp, AdminRequest
from shadowlane.admin.control_api import install_control_api
from shadowlane.app import Generation, build_generation
from shadowlane.config import parse_config
from shadowlane.control import Control, ControlError
from shadowlane.metrics import Metrics

CONFIG = """
listen: 127.0.0.1:0
backends:
  v1: {endpoints: [http://127.0.0.1:9]}
  v2: {endpoints: [http://127.0.0.1:9]}
  s: {endpoints: [http://127.0.0.1:9]}
routes:
  - name: api
    match: {path_prefix: /}
    backends: [{backend: v1, weight: 100}, {backend: v2, weight: 0}]
    shadows: [{backend: s, percent: 100}]
"""


def _generation() -> Generation:
    return build_generation(parse_config(CONFIG), Metrics(), None)


def test_runtime_changes_steer_the_generation_and_leave_the_config_as_the_file_says() -> None:
    async def scenario() -> None:
        gen = _generation()
        control = Control(lambda: gen, None, writer=True)
        plan = gen.shadow.plans["api"].lanes[0]

        assert control.set_percent("api", "s", 25) == 25.0
        control.set_paused("api", "s", True)
        assert plan.sampler.percent == 25.0 and plan.lane.paused
        # the model keeps the file's value; the effective config overlays the live one
        assert gen.cfg.routes[0].shadows[0].percent == 100
        shadow = control.snapshot()["routes"][0]["shadows"][0]
        assert (shadow["percent"], shadow["paused"]) == (25.0, True)

        control.set_paused("api", "s", False)
        assert not plan.lane.paused
        await gen.shadow.drain(0)

    asyncio.run(scenario())


def test_weights_show_in_the_route_legs_of_the_effective_config() -> None:
    async def scenario() -> None:
        gen = _generation()
        control = Control(lambda: gen, None, writer=True)
        assert control.set_weights("api", {"v2": 100}) == {"v1": 0, "v2": 100}
        route = control.snapshot()["routes"][0]
        assert route["weights"] == {"v1": 0, "v2": 100}
        assert [(leg["backend"], leg["weight"]) for leg in route["backends"]] == [
            ("v1", 0),
            ("v2", 100),
        ]
        await gen.shadow.drain(0)

    asyncio.run(scenario())


def test_control_acts_on_the_generation_serving_now() -> None:
    """A reload swaps the generation: the next change lands on the new one."""

    async def scenario() -> None:
        old, new = _generation(), _generation()
        serving = [old]
        control = Control(lambda: serving[0], None, writer=True)
        serving[0] = new
        control.set_percent("api", "s", 10)
        assert new.shadow.plans["api"].lanes[0].sampler.percent == 10.0
        assert old.shadow.plans["api"].lanes[0].sampler.percent == 100.0
        await old.shadow.drain(0)
        await new.shadow.drain(0)

    asyncio.run(scenario())


class FakeControl:
    """What the API needs, and no more: it refuses what the tests ask it to."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def snapshot(self) -> dict[str, Any]:
        return {"routes": [], "runtime": {}}

    def set_weights(self, route_name: str, weights: object) -> dict[str, int]:
        if route_name != "api":
            raise ControlError(404, f"no route {route_name!r}")
        self.calls.append(("weights", route_name, weights))
        return {"v1": 0, "v2": 100}

    def set_percent(self, route: str, target: str, percent: object) -> float:
        if not isinstance(percent, int | float):
            raise ControlError(400, "percent must be a number in 0..100")
        self.calls.append(("percent", route, target, percent))
        return float(percent)

    def set_paused(self, route: str, target: str, paused: bool) -> None:
        self.calls.append(("paused", route, target, paused))


def _call(app: AdminApp, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    headers = {"authorization": "Bearer t"}
    req = AdminRequest(method=method, path=path, headers=headers, body=body)
    response = asyncio.run(app.handle(req))
    return response.status, orjson.loads(response.body)


def test_control_api_maps_refusals_to_statuses() -> None:
    control = FakeControl()
    app = AdminApp(Metrics(), token="t")
    install_control_api(app, control, lambda: ["routes[0].backend: unknown backend 'x'"])
    percent = "/api/routes/api/shadows/s/percent"

    assert _call(app, "PUT", percent, b'{"percent": 5}') == (
        200,
        {"route": "api", "target": "s", "percent": 5.0},
    )
    assert _call(app, "PUT", percent, b"not json")[0] == 400
    assert _call(app, "PUT", percent, b"[1]")[0] == 400
    assert _call(app, "PUT", percent, b'{"percent": "x"}')[0] == 400
    assert _call(app, "PUT", "/api/routes/nope/weights", b'{"weights": {}}')[0] == 404
    assert _call(app, "POST", "/api/routes/api/shadows/s/pause")[1]["paused"] is True
    status, body = _call(app, "POST", "/api/reload")
    assert status == 422 and "unknown backend 'x'" in body["error"], body
    assert control.calls == [("percent", "api", "s", 5), ("paused", "api", "s", True)]


def test_no_reload_route_without_a_reload() -> None:
    app = AdminApp(Metrics(), token="t")
    install_control_api(app, FakeControl())
    assert _call(app, "POST", "/api/reload")[0] == 404
    assert _call(app, "GET", "/api/config") == (200, {"routes": [], "runtime": {}})
