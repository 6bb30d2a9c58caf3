"""Route and shadow match predicates, as written in the file.

The checks here (methods are tokens, paths start with `/`, regexes compile, hosts have no port)
are the ones `routing.predicates` relies on when it compiles a match, so a mistake shows up as a
config error naming its key instead of a route that silently never matches. Header names are
lower-cased here because that is how the wire layer keeps them.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

from shadowlane.config.base import _Model
from shadowlane.config.units import _TOKEN


def _upper_methods(value: object) -> object:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [v.upper() if isinstance(v, str) else v for v in value]
    return value


def _check_methods(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("must not be empty (leave methods out to match any method)")
    for m in value:
        if not _TOKEN.fullmatch(m):
            raise ValueError(f"not an HTTP method: {m!r}")
    return value


Methods = Annotated[
    list[str] | None, BeforeValidator(_upper_methods), AfterValidator(_check_methods)
]


def _lower_header_names(value: object) -> object:
    if isinstance(value, dict):
        lowered: dict[object, object] = {}
        for k, v in value.items():
            key = k.lower() if isinstance(k, str) else k
            if key in lowered:
                raise ValueError(f"header {k!r} given twice (names are case-insensitive)")
            lowered[key] = v
        return lowered
    return value


def _check_header_names(value: dict[str, str] | None) -> dict[str, str] | None:
    for name in value or ():
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"not a header name: {name!r}")
    return value


HeaderMap = Annotated[
    dict[str, str] | None,
    BeforeValidator(_lower_header_names),
    AfterValidator(_check_header_names),
]


def _check_path(value: str | None) -> str | None:
    if value is not None and not value.startswith("/"):
        raise ValueError(f"must start with '/': {value!r}")
    return value


PathStr = Annotated[str | None, AfterValidator(_check_path)]


def _compile_regex(value: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"bad regex {value!r}: {exc}") from None


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        _compile_regex(value)
    return value


RegexStr = Annotated[str | None, AfterValidator(_check_regex)]


def _check_host(value: str | None) -> str | None:
    """Hosts match lower-cased and without port, because that is how `Request.host` is kept."""
    if value is None:
        return None
    host = value.lower()
    bare = host[2:] if host.startswith("*.") else host
    if not bare or "*" in bare:
        raise ValueError(f"bad host {value!r}: use a name or *.suffix")
    if ":" in bare and not bare.startswith("["):
        raise ValueError(f"no port in a host match: {value!r} (the port is not compared)")
    return host


class MatchConfig(_Model, frozen=True):
    """Predicates of a route; all given ones must hold (AND). Empty matches every request."""

    host: Annotated[str | None, AfterValidator(_check_host)] = None
    path: PathStr = None
    path_prefix: PathStr = None
    path_regex: RegexStr = None
    methods: Methods = None
    headers: HeaderMap = None
    query: dict[str, str] | None = None


class ShadowMatch(_Model, frozen=True):
    """Extra conditions for sending a shadow copy, on top of the route's match."""

    methods: Methods = None
    path_prefix: PathStr = None
    headers: HeaderMap = None
