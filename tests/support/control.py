"""The proxy's control API (admin listener, ``/api/...``) driven from outside, as an operator
would: with ``requests``, a bearer token from the environment, and the effective config the
proxy reports.

Why the token lives here: tests of reloads, weights, pause/resume and authorization all start
proxies whose ``admin.token_env`` names :data:`TOKEN_ENV`, and pass :data:`ENV` so the variable
is set in the proxy's environment; a test that wants the API read-only leaves ``admin=ADMIN``
out (or points ``token_env`` at an unset variable).
"""

from __future__ import annotations

from typing import Any

import requests

from .proxy import ProxyFactory, ProxyProcess
from .wait import wait_until

TOKEN_ENV = "SHADOWLANE_TEST_ADMIN_TOKEN"
TOKEN = "ops-test-token-5f1c"
#: the proxy's environment, with the token set
ENV = {TOKEN_ENV: TOKEN}
#: the admin section that makes the control API check the bearer token
ADMIN = {"token_env": TOKEN_ENV}
#: the header of an authorized call
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def started(
    proxy_factory: ProxyFactory, config: dict[str, Any], timeout: float = 5.0, **kw: Any
) -> ProxyProcess:
    """A started proxy whose admin app answers ``/healthz`` with 200: the ready file says the
    admin socket accepts; this says the app behind it serves (and is not draining)."""
    proxy = proxy_factory(config, **kw)

    def admin_up() -> bool:
        try:
            return requests.get(proxy.admin_url + "/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(admin_up, timeout, "the admin listener")
    return proxy


def admin_call(
    proxy: ProxyProcess,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = AUTH,
    timeout: float = 5.0,
) -> requests.Response:
    """``method path`` on the admin listener with a JSON ``body``; authorized by default
    (``headers=None`` sends no credentials)."""
    return requests.request(
        method, proxy.admin_url + path, json=body, headers=headers or {}, timeout=timeout
    )


def effective(proxy: ProxyProcess, timeout: float = 5.0) -> dict[str, Any]:
    """``GET /api/config``: the config in force, runtime overrides included (needs no token)."""
    r = requests.get(proxy.admin_url + "/api/config", timeout=timeout)
    assert r.status_code == 200, (r.status_code, r.text)
    doc: dict[str, Any] = r.json()
    return doc


def route_of(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """Route ``name`` of an effective config (fails, listing the routes, if there is none)."""
    for rc in doc["routes"]:
        if rc["name"] == name:
            return dict(rc)
    raise AssertionError(f"no route {name!r} in {[rc['name'] for rc in doc['routes']]}")


__all__ = [
    "ADMIN",
    "AUTH",
    "ENV",
    "TOKEN",
    "TOKEN_ENV",
    "admin_call",
    "effective",
    "route_of",
    "started",
]
