"""Compare settings of one shadow, compiled once from the three places rules come from.

The proxy builds a `CompareSettings` per compared shadow when it plans a route (and again on a
config reload) and puts it in every `CompareJob.settings`; the engine never looks at the config
itself, so per-request work is only matching paths against already compiled rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shadowlane.compare.grpc import GrpcSchema
from shadowlane.compare.paths import PathMatcher
from shadowlane.compare.redact import Redaction
from shadowlane.config import (
    DEFAULT_IGNORE_HEADERS,
    CompareConfig,
    RouteCompare,
    RouteConfig,
    ShadowCompare,
    ShadowConfig,
)

Mode = Literal["strict", "subset", "schema"]


@dataclass(frozen=True, slots=True)
class CompareSettings:
    """Everything the engine needs to compare the answers of one shadow."""

    mode: Mode = "strict"
    #: paths left out (global + route + shadow rules); covers the subtree below each match
    ignore: PathMatcher = field(default_factory=lambda: PathMatcher((), subtree=True))
    #: array paths compared as multisets
    unordered: PathMatcher = field(default_factory=lambda: PathMatcher((), subtree=False))
    #: lower-case header names never compared
    ignore_headers: frozenset[str] = frozenset(DEFAULT_IGNORE_HEADERS)
    #: capture cap per answer (bytes); also the cap on decompressed bodies
    max_body: int = 1024**2
    #: the secondary backend's name, when noise is measured
    secondary: str | None = None
    #: what is removed or masked in the examples kept in the store (the route's `record.redact`
    #: and the shadow's); comparing happens before, on the answers as captured
    redact: Redaction | None = None
    #: the descriptor set that gives gRPC answers' fields their proto names (`compare.grpc` of
    #: the shadow, else the route, else the global block); None: by field number
    grpc: GrpcSchema | None = None
    #: `ignore_headers` as bytes, as header names travel (lower-cased by the wire layer): what
    #: `identical_answers` tests on the event loop, per header of every compared answer,
    #: without decoding and lower-casing each name there
    ignore_header_names: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = frozenset(h.encode("latin-1") for h in self.ignore_headers)
        object.__setattr__(self, "ignore_header_names", names)


DEFAULT_SETTINGS = CompareSettings()


def compile_settings(
    shadow_cfg: ShadowConfig | ShadowCompare | None = None,
    route_cfg: RouteConfig | RouteCompare | None = None,
    compare_cfg: CompareConfig | None = None,
    redact: Redaction | None = None,
) -> CompareSettings:
    """Merge global, route and shadow rules into one compiled `CompareSettings`.

    Each argument may be left out (defaults). `shadow_cfg` may be the shadow's config (its
    `compare_enabled` is used; a shadow that does not compare gets the defaults) or a
    `ShadowCompare` directly; `route_cfg` likewise a route or its `RouteCompare`. `redact`: the
    rules applied to stored examples (compiled with their secret by the recording's builder).
    A `grpc` descriptor set is read here (raises ValueError when it no longer builds a pool).
    """
    if isinstance(shadow_cfg, ShadowConfig):
        shadow = shadow_cfg.compare_enabled or ShadowCompare()
    else:
        shadow = shadow_cfg or ShadowCompare()
    if isinstance(route_cfg, RouteConfig):
        route = route_cfg.compare or RouteCompare()
    else:
        route = route_cfg or RouteCompare()
    glob = compare_cfg or CompareConfig()
    ignore = [*glob.ignore, *route.ignore, *shadow.ignore]
    headers = frozenset(h.lower() for h in (*glob.ignore_headers, *shadow.ignore_headers))
    grpc = shadow.grpc or route.grpc or glob.grpc
    return CompareSettings(
        mode=shadow.mode,
        ignore=PathMatcher(ignore, subtree=True),
        unordered=PathMatcher(shadow.unordered, subtree=False),
        ignore_headers=headers,
        max_body=shadow.max_body,
        secondary=shadow.secondary,
        redact=redact if redact else None,
        grpc=GrpcSchema.load(grpc.descriptor_set, tuple(grpc.services)) if grpc else None,
    )
