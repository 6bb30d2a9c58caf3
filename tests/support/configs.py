"""Proxy configs for tests, as the dicts :class:`support.proxy.ProxyProcess` writes to YAML.

Why builders: most e2e tests need "one route, one primary, one or two shadows", and written out
by hand each is a dozen lines in which the detail a test is about (a percent, a timeout, a
``max_body``) is hard to spot. The builders write the common part; what a test passes is what
it is about. They only write the documented config format (docs/config.md) and import nothing
from shadowlane, so a test still says what the file says, not what the proxy's models accept.

``listen`` and ``admin.listen`` are left out: :class:`ProxyProcess` fills them (port 0).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

#: what :func:`backend_entry` and :func:`basic_config` give a backend unless told otherwise
TIMEOUT = "5s"
CONNECT_TIMEOUT = "1s"


def backend_entry(
    *endpoints: str, timeout: str = TIMEOUT, connect_timeout: str = CONNECT_TIMEOUT, **options: Any
) -> dict[str, Any]:
    """One ``backends:`` entry: ``endpoints``, the test timeouts (5 s, connect 1 s: a test
    fails in seconds, not at the proxy's defaults), and any other keys as given."""
    return {
        "endpoints": list(endpoints),
        "timeout": timeout,
        "connect_timeout": connect_timeout,
        **options,
    }


def basic_config(*endpoints: str, timeout: str = TIMEOUT, **extra: Any) -> dict[str, Any]:
    """The smallest useful config: one backend ``b1`` with ``endpoints``, one route ``/`` to it.

    ``extra`` keys are merged at the top level (e.g. ``compare=...``); ``listen`` and
    ``admin.listen`` are filled in by :class:`ProxyProcess` (port 0).
    """
    config: dict[str, Any] = {
        "backends": {"b1": backend_entry(*endpoints, timeout=timeout)},
        "routes": [{"name": "r1", "match": {"path_prefix": "/"}, "backend": "b1"}],
    }
    config.update(extra)
    return config


def shadow_config(
    backends: Mapping[str, str | Mapping[str, Any]],
    *,
    route: str = "r1",
    primary: str = "p",
    shadows: Sequence[str | Mapping[str, Any]] = ("s",),
    **extra: Any,
) -> dict[str, Any]:
    """One route ``route`` for every path (``path_prefix: /``) to backend ``primary``, copied
    to each of ``shadows``.

    ``backends`` maps each name to a URL (an entry made by :func:`backend_entry`, with the test
    timeouts) or to a whole entry, used as given. A shadow is a backend name (copied at 100%:
    ``{"backend": name, "percent": 100}``) or a whole ``shadows:`` entry, used as given (so a
    test that leaves ``percent`` out gets the proxy's default). ``extra`` keys go to the top
    level (``admin=``, ``compare=``, ``limits=``). Everything is copied: a test may edit what it
    got without touching what it passed.
    """
    return {
        "backends": {
            name: backend_entry(b) if isinstance(b, str) else copy.deepcopy(dict(b))
            for name, b in backends.items()
        },
        "routes": [
            {
                "name": route,
                "match": {"path_prefix": "/"},
                "backend": primary,
                "shadows": [
                    {"backend": s, "percent": 100} if isinstance(s, str) else copy.deepcopy(dict(s))
                    for s in shadows
                ],
            }
        ],
        **copy.deepcopy(extra),
    }


__all__ = ["CONNECT_TIMEOUT", "TIMEOUT", "backend_entry", "basic_config", "shadow_config"]
