"""The comparison API and the dashboard, served by the admin listener.

`install_comparison_api(admin, store)` adds:

- `GET /api/comparisons/summary`: one entry per route and target (`store.summary()`),
- `GET /api/comparisons/{route}/{target}/fields`: per-field difference and noise rates,
- `GET /api/comparisons/{route}/{target}/examples?field=F&limit=N`: example answer pairs,
- `GET /api/ledger`: the divergence ledger (`admin/ledger.py`: parameters and shape),
- `GET /` the dashboard page and `GET /static/{name}` its script and style sheet.

`store` is the analysed view (`shadowlane.compare.Analysis` over a `Store`), not the store's rows:
which field is reported is Diffy's rule with the configured thresholds, decided there once for the
API, the dashboard (which only reads the API) and `report` alike. This module only serves it.

Store queries may block (SQLite on a slow disk, PostgreSQL over the network), so each one runs in
a worker thread; at most `MAX_CONCURRENT_QUERIES` run at once and each gets `QUERY_TIMEOUT`
seconds before the client is told 503. The admin loop never waits on the store, so `/metrics`
and `/healthz` stay responsive however slow the store is.

The dashboard is static files shipped as package data (`admin/static/`), read once at install
time (each page's head from `head.html`, which both pages share): no CDN, no build step, and a
Content-Security-Policy that allows only this origin, so the page works on an air-gapped machine
and cannot be made to load anything else.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from importlib import resources
from typing import Any, Protocol, TypeVar

from shadowlane.admin.app import AdminApp
from shadowlane.admin.ledger import LedgerParamError, ledger_document, parse_ledger_query
from shadowlane.admin.messages import AdminRequest, AdminResponse, error_response, json_response
from shadowlane.store import LedgerQueries

__all__ = [
    "DEFAULT_EXAMPLE_LIMIT",
    "MAX_CONCURRENT_QUERIES",
    "MAX_EXAMPLE_LIMIT",
    "QUERY_TIMEOUT",
    "ComparisonQueries",
    "install_comparison_api",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_EXAMPLE_LIMIT = 20
MAX_EXAMPLE_LIMIT = 100
#: store queries running at once; more wait (the dashboard polls every 2 s per open page)
MAX_CONCURRENT_QUERIES = 4
#: seconds one store query may take before the client gets a 503 (the thread finishes anyway)
QUERY_TIMEOUT = 10.0

#: static file name -> content type; only these are served (no directory walking)
_STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "migrations.html": "text/html; charset=utf-8",
    "migrations.js": "text/javascript; charset=utf-8",
}

_PAGE_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    # Small files, and a new version must show after an upgrade without a hard reload.
    ("cache-control", "no-cache"),
)
_API_HEADERS: tuple[tuple[str, str], ...] = (
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
)


class ComparisonQueries(Protocol):
    """The analysed read side of the comparison store, as the API uses it (`Analysis` has it).

    A protocol rather than `Analysis` itself, so the API can be tested with canned answers and
    the application can hand it a view that follows store changes on reload. Callable from any
    thread.
    """

    def summary(self) -> list[dict[str, Any]]: ...

    def fields(self, route: str, target: str) -> list[dict[str, Any]]: ...

    def examples(
        self, route: str, target: str, field: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]: ...


class _StoreUnavailable(Exception):
    pass


#: a page's first line: what its copy of the head both pages share (`static/head.html`) says
_HEAD_LINE = re.compile(rb'<!-- head title="([^"<>]+)" script="([A-Za-z0-9_.-]+)" -->\n')


def _with_head(page: bytes, head: bytes, name: str) -> bytes:
    """`page` with its first line replaced by the shared head, its title and script filled in.

    One head for every page, so a change to it (the style sheet, a meta tag) cannot reach one
    page and miss the other; filled in once at load, so what is served is a whole document.
    """
    found = _HEAD_LINE.match(page)
    if found is None or found[2].decode() not in _STATIC_TYPES:
        raise ValueError(
            f"admin/static/{name}: the first line must be "
            '<!-- head title="..." script="<a served script>" -->'
        )
    filled = head.replace(b"{title}", found[1]).replace(b"{script}", found[2])
    return filled + page[found.end() :]


def load_static() -> dict[str, bytes]:
    """The dashboard's files from the installed package (raises if one is missing), each page
    with the shared head; the head alone is not served."""
    folder = resources.files("shadowlane.admin").joinpath("static")
    head = folder.joinpath("head.html").read_bytes()
    files = {}
    for name in _STATIC_TYPES:
        data = folder.joinpath(name).read_bytes()
        files[name] = _with_head(data, head, name) if name.endswith(".html") else data
    return files


def static_file(name: str, _cache: dict[str, bytes] = {}) -> AdminResponse:  # noqa: B006
    """One of the dashboard's files as a response (read once, then kept)."""
    if not _cache:
        _cache.update(load_static())
    return AdminResponse(body=_cache[name], content_type=_STATIC_TYPES[name], headers=_PAGE_HEADERS)


#: the ledger's answer without a store: empty, not an error
_EMPTY_LEDGER: dict[str, Any] = {
    "entries": [],
    "counts": [],
    "suspect_keys": [],
    "suspect_keys_truncated": False,
    "open": 0,
}


class _ComparisonApi:
    def __init__(
        self,
        store: ComparisonQueries | None,
        static: dict[str, bytes],
        ledger: LedgerQueries | None = None,
    ) -> None:
        self._store = store
        self._static = static
        self._ledger = ledger
        # Created on first use, so it belongs to the loop the admin server runs on.
        self._slots: asyncio.Semaphore | None = None

    async def _query(self, call: Callable[[], T]) -> T:
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_CONCURRENT_QUERIES)
        try:
            async with self._slots, asyncio.timeout(QUERY_TIMEOUT):
                return await asyncio.to_thread(call)
        except TimeoutError:
            log.warning("comparison store query took longer than %ss", QUERY_TIMEOUT)
            raise _StoreUnavailable("comparison store timed out") from None
        except Exception as exc:
            log.exception("comparison store query failed")
            raise _StoreUnavailable(f"comparison store failed: {type(exc).__name__}") from None

    async def _answer(self, call: Callable[[], Any]) -> AdminResponse:
        try:
            result = await self._query(call)
        except _StoreUnavailable as exc:
            return error_response(503, str(exc), headers=_API_HEADERS)
        return json_response(result, headers=_API_HEADERS)

    # -- API ------------------------------------------------------------------------------------

    async def summary(self, request: AdminRequest) -> AdminResponse:
        store = self._store
        if store is None:
            return json_response([], headers=_API_HEADERS)
        return await self._answer(store.summary)

    async def fields(self, request: AdminRequest) -> AdminResponse:
        store = self._store
        if store is None:
            return json_response([], headers=_API_HEADERS)
        route, target = request.params["route"], request.params["target"]
        return await self._answer(lambda: store.fields(route, target))

    async def examples(self, request: AdminRequest) -> AdminResponse:
        raw_limit = request.query.get("limit", "")
        limit = DEFAULT_EXAMPLE_LIMIT
        if raw_limit:
            if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_EXAMPLE_LIMIT:
                return error_response(
                    400, f"limit: must be an integer 1..{MAX_EXAMPLE_LIMIT}", limit=raw_limit
                )
            limit = int(raw_limit)
        field = request.query.get("field") or None
        store = self._store
        if store is None:
            return json_response([], headers=_API_HEADERS)
        route, target = request.params["route"], request.params["target"]
        return await self._answer(lambda: store.examples(route, target, field, limit))

    async def ledger(self, request: AdminRequest) -> AdminResponse:
        try:
            f = parse_ledger_query(request.query)
        except LedgerParamError as err:
            return error_response(
                400, str(err), headers=_API_HEADERS, param=err.param, value=err.value
            )
        queries = self._ledger
        if queries is None:
            return json_response(_EMPTY_LEDGER, headers=_API_HEADERS)
        return await self._answer(lambda: ledger_document(queries, f))

    # -- dashboard ------------------------------------------------------------------------------

    async def index(self, request: AdminRequest) -> AdminResponse:
        return self._file("index.html")

    async def static(self, request: AdminRequest) -> AdminResponse:
        name = request.params["name"]
        if name not in _STATIC_TYPES:
            return error_response(404, "not found", path=request.path)
        return self._file(name)

    def _file(self, name: str) -> AdminResponse:
        return AdminResponse(
            body=self._static[name], content_type=_STATIC_TYPES[name], headers=_PAGE_HEADERS
        )


def install_comparison_api(
    admin: AdminApp, store: ComparisonQueries | None, *, ledger: LedgerQueries | None = None
) -> None:
    """Serve the comparison API, the ledger API and the dashboard on `admin`.

    `store` answers the queries (see `ComparisonQueries`), usually an `Analysis` of the store;
    None means comparison is not configured: the API answers empty lists and the dashboard says
    there is nothing to show. `ledger` answers `/api/ledger` (a `Store`, or the instance's view
    of it); None is an empty ledger. Both share the bound on concurrent store queries.
    Call it once per AdminApp, before or after `admin.start()`.
    """
    api = _ComparisonApi(store, load_static(), ledger)
    admin.route("GET", "/api/comparisons/summary", api.summary)
    admin.route("GET", "/api/comparisons/{route}/{target}/fields", api.fields)
    admin.route("GET", "/api/comparisons/{route}/{target}/examples", api.examples)
    admin.route("GET", "/api/ledger", api.ledger)
    admin.route("GET", "/", api.index)
    admin.route("GET", "/static/{name}", api.static)
