"""The migrations API and its dashboard page, served by the admin listener.

- `GET /api/migrations` (and `/api/migrations/{name}`): each migration's stage, its gates with
  measured values and thresholds, what blocks, time in stage, the newest audit records;
- `POST /api/migrations/{name}/advance` and `POST /api/migrations/{name}/rollback` (body
  optional: `{"to": "STAGE", "by": "who"}`), behind the admin token;
- `GET /migrations`: the page (stages as a timeline, gates green or red, the buttons).

What a migration is and how it moves is `shadowlane.migrate`'s; this module sees it through
`Migrations`, so the admin layer depends on neither the runtime nor the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from shadowlane.admin.app import AdminApp
from shadowlane.admin.comparisons import static_file
from shadowlane.admin.messages import AdminRequest, AdminResponse, error_response, json_response

__all__ = ["Migrations", "install_migrations_api"]

_NO_CACHE = (("cache-control", "no-store"),)


class Migrations(Protocol):
    async def status(self, name: str | None = None) -> list[dict[str, Any]]: ...

    async def advance(self, name: str, actor: str) -> dict[str, Any]: ...

    async def rollback(self, name: str, actor: str, to: str | None) -> dict[str, Any]: ...


def _body(req: AdminRequest) -> dict[str, Any] | None:
    if not req.body:
        return {}
    try:
        data = req.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _actor(body: dict[str, Any]) -> str:
    who = body.get("by")
    return f"admin:{who}" if isinstance(who, str) and who.strip() else "admin"


def install_migrations_api(
    admin: AdminApp,
    migrations: Migrations,
    refused: type[Exception],
) -> None:
    """Serve the migrations API and page; `refused` is the error type a transition that does
    not apply raises (answered 409 with its message)."""

    async def listing(_req: AdminRequest) -> AdminResponse:  # stale copies while the store is away
        return json_response({"migrations": await migrations.status()}, headers=_NO_CACHE)

    async def one(req: AdminRequest) -> AdminResponse:
        found = await migrations.status(req.params["name"])
        if not found:
            return error_response(404, f"no migration {req.params['name']!r}")
        return json_response(found[0], headers=_NO_CACHE)

    def mutation(
        act: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]],
    ) -> Callable[[AdminRequest], Awaitable[AdminResponse]]:
        async def handler(req: AdminRequest) -> AdminResponse:
            body = _body(req)
            if body is None:
                return error_response(400, "body must be a JSON object (or empty)")
            to = body.get("to")
            if to is not None and not isinstance(to, str):
                return error_response(400, '"to" must be a stage name')
            name = req.params["name"]
            if not await migrations.status(name):
                return error_response(404, f"no migration {name!r}")
            try:
                return json_response(await act(name, body))
            except refused as err:
                return error_response(409, str(err))
            except Exception as err:  # the store's driver errors: it is not reachable
                return error_response(503, f"store unreachable, nothing changed: {err}")

        return handler

    async def advance(name: str, body: dict[str, Any]) -> dict[str, Any]:
        return await migrations.advance(name, _actor(body))

    async def rollback(name: str, body: dict[str, Any]) -> dict[str, Any]:
        return await migrations.rollback(name, _actor(body), body.get("to"))

    async def page(_req: AdminRequest) -> AdminResponse:
        return static_file("migrations.html")

    admin.route("GET", "/api/migrations", listing)
    admin.route("GET", "/api/migrations/{name}", one)
    admin.route("POST", "/api/migrations/{name}/advance", mutation(advance), mutating=True)
    admin.route("POST", "/api/migrations/{name}/rollback", mutation(rollback), mutating=True)
    admin.route("GET", "/migrations", page)
