"""A route that splits its traffic never copies a request to the backend that answered it.

During a weighted split (a canary, or a migration's flip step) the new backend is both one leg
of the route and its shadow. A request the new backend answered as primary must not be copied to
it again: the copy would compare the backend with itself and, for a write, write twice. It is
counted `skipped_primary`; the requests the old leg answered are copied as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from support.backend import RecordingBackend
from support.client import get
from support.configs import shadow_config
from support.metrics import settle
from support.proxy import ProxyProcess

N = 40


def test_requests_the_shadow_answered_as_primary_are_not_copied_to_it(
    backends: Callable[..., RecordingBackend], proxy_factory: Callable[..., ProxyProcess]
) -> None:
    old, new = backends(), backends()
    cfg: dict[str, Any] = shadow_config({"old": old.url, "new": new.url}, shadows=["new"])
    route = cfg["routes"][0]
    del route["backend"]
    route["backends"] = [{"backend": "old", "weight": 1}, {"backend": "new", "weight": 1}]
    proxy = proxy_factory(cfg)
    for i in range(N):
        assert get(proxy.port, f"/docs/{i}", method="PUT").status == 200
    got = settle(proxy, "r1", "new", N)
    primaries_new = [r for r in new.requests if r.header("x-shadowlane-shadow") is None]
    copies = [r for r in new.requests if r.header("x-shadowlane-shadow") is not None]
    assert len(old.requests) + len(primaries_new) == N
    # smooth weighted round robin at 1:1 alternates exactly: half of them each way
    assert len(old.requests) == N // 2 == len(primaries_new)
    # every request the old leg answered was copied, none of the new leg's own
    assert got.get("skipped_primary") == N // 2
    assert got.get("ok") == N // 2 == len(copies)
    assert {r.path for r in copies} == {r.path for r in old.requests}
    assert not {r.path for r in copies} & {r.path for r in primaries_new}
