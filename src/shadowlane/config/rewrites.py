"""A route's changes to the request it forwards: its path, headers and Host.

The same vocabulary as a shadow's mutations (`rewrite_path`, `headers`, `host`), with what the
peers' routes have on top: Envoy's `prefix_rewrite` (the matched prefix replaced) beside the
regex form, and `headers.add` (a value appended, as Envoy's `append` and Gateway API's `add`).
Everything is checked here, so the proxy applies precompiled changes without checking them
again: the headers shadowlane manages on the forwarded request (framing, the connection,
hop-by-hop ones, the request id that joins the primary with its copies, the loop marker, Host
outside `host:`) cannot be touched, and values must be something a header can hold.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, Field, field_validator, model_validator

from shadowlane.config.base import _Model, _none_to_empty
from shadowlane.config.matching import _lower_header_names
from shadowlane.config.shadows import PathRewrite, _check_header_value
from shadowlane.config.units import _TOKEN

#: headers the forwarded request's framing, connection, request id and loop detection depend
#: on: shadowlane sets them, a route may not
ROUTE_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "x-request-id",
        "x-shadowlane-shadow",
    }
)


def _check_route_header(name: str) -> None:
    if name in ROUTE_RESERVED_HEADERS:
        hint = "use the route's host:" if name == "host" else "shadowlane manages it"
        raise ValueError(f"header {name!r} cannot be changed here ({hint})")
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"not a header name: {name!r}")


def _lower_names(value: object) -> object:
    if isinstance(value, list):
        return [v.lower() if isinstance(v, str) else v for v in value]
    return value


class RouteHeaders(_Model, frozen=True):
    """Headers of the forwarded request: `remove` first, then `set` (replaces any value the
    client sent), then `add` (one more value, after the client's), as Envoy's header parser
    orders them."""

    set: Annotated[dict[str, str], BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=dict
    )
    add: Annotated[dict[str, str], BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=dict
    )
    remove: Annotated[list[str], BeforeValidator(_none_to_empty(list))] = Field(
        default_factory=list
    )

    @field_validator("set", "add", mode="before")
    @classmethod
    def _lower_maps(cls, value: object) -> object:
        return _lower_header_names(value)

    @field_validator("remove", mode="before")
    @classmethod
    def _lower_remove(cls, value: object) -> object:
        return _lower_names(value)

    @field_validator("set", "add")
    @classmethod
    def _check_map(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            _check_route_header(name)
            _check_header_value(name, text)
        return value

    @field_validator("remove")
    @classmethod
    def _check_remove(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_route_header(name)
        return value

    @property
    def empty(self) -> bool:
        return not (self.set or self.add or self.remove)


class RoutePathRewrite(_Model, frozen=True):
    """`{prefix: NEW}`: the route's matched `path_prefix` (or its whole `path`) replaced by
    NEW, Envoy's `prefix_rewrite`; or `{regex, replacement}`: `re.sub` once on the path, as a
    shadow's `rewrite_path`. The query is kept either way."""

    prefix: str | None = None
    regex: str | None = None
    replacement: str | None = None

    @field_validator("prefix")
    @classmethod
    def _prefix_is_a_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must start with '/': {value!r}")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> RoutePathRewrite:
        if self.prefix is not None:
            if self.regex is not None or self.replacement is not None:
                raise ValueError("set either prefix, or regex and replacement, not both")
            return self
        if self.regex is None or self.replacement is None:
            raise ValueError("needs prefix, or regex and replacement")
        # the shadow's checks: the regex compiles, its replacement names groups it has
        PathRewrite(regex=self.regex, replacement=self.replacement)
        return self

    @property
    def pattern(self) -> re.Pattern[str] | None:
        return re.compile(self.regex) if self.regex is not None else None


def _check_route_host(value: str | None) -> str | None:
    """A literal Host (`name[:port]`), or `backend`: the authority of the endpoint chosen."""
    if value is None or value == "backend":
        return value
    if not value or not re.fullmatch(r"[A-Za-z0-9._~-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?", value):
        raise ValueError(f"not a host[:port]: {value!r}")
    return value
