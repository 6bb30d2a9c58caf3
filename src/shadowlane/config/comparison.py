"""Comparison settings: how answers are compared, where results go, when a field is reported.

Field paths are checked here, with the grammar `compare.paths` matches by, so a typo in an
ignore rule is a config error naming its key rather than a rule that silently matches nothing.
The defaults written here (ignored headers, Diffy's thresholds, store limits) are meant to be
the only copy of them: another layer that needs a default reads it from a model instance
(`CompareThresholds().relative`) instead of writing the number again.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    model_validator,
)

from shadowlane.config.base import _Model, _none_to_empty
from shadowlane.config.descriptors import read_descriptor_set
from shadowlane.config.units import _TOKEN, Duration, Int, Size, Timeout, _positive

_PATH_SEGMENT = re.compile(r"\*\*|[^.\[\]]+|\[(?:\*|\d+)\]")


def _check_field_path(value: str) -> str:
    """A field path rule: `body.took`, `body.hits.hits[*]._score`, `headers.x-trace-id`, `**.id`.

    Checked here (not only in the engine) so a typo is a config error naming the key, not a rule
    that silently matches nothing. Keys are separated by `.`, indexes are `[N]` or `[*]`, `*`
    inside a key matches any characters of one key, `**` any number of segments.
    """
    text = value.strip()
    if not text:
        raise ValueError("empty field path")
    if text.endswith("."):
        raise ValueError(f"bad field path {value!r}: ends with '.'")
    pos = 0
    first = True
    while pos < len(text):
        if not first and text[pos] == ".":
            pos += 1
        elif not first and text[pos] != "[":
            raise ValueError(f"bad field path {value!r} at {text[pos:]!r}")
        m = _PATH_SEGMENT.match(text, pos)
        if m is None or (first and m.group().startswith("[")):
            raise ValueError(
                f"bad field path {value!r}: use dotted keys and [N] / [*], "
                "e.g. body.items[*].id (* = one key, ** = any depth)"
            )
        pos = m.end()
        first = False
    root = re.split(r"[.\[]", text, maxsplit=1)[0]
    if root not in ("status", "headers", "trailers", "body", "**", "*"):
        raise ValueError(
            f"bad field path {value!r}: must start with status, headers, trailers, body, * or **"
        )
    return text


FieldPath = Annotated[str, AfterValidator(_check_field_path)]
FieldPaths = Annotated[list[FieldPath], BeforeValidator(_none_to_empty(list))]


def _lower_names(value: object) -> object:
    if isinstance(value, list):
        return [v.strip().lower() if isinstance(v, str) else v for v in value]
    return value


def _check_header_name_list(value: list[str]) -> list[str]:
    for name in value:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"not a header name: {name!r}")
    return value


HeaderNames = Annotated[
    list[str],
    BeforeValidator(_none_to_empty(list)),
    BeforeValidator(_lower_names),
    AfterValidator(_check_header_name_list),
]


def _descriptor_file(value: str) -> str:
    if not os.path.isfile(value):
        raise ValueError(f"no such file: {value}")
    return value


class GrpcCompare(_Model, frozen=True):
    """Proto names for gRPC answers (`compare.grpc`): a descriptor set and, optionally, which of
    its services to decode with it. Without it gRPC messages are still compared, by field
    number."""

    #: `protoc --include_imports --descriptor_set_out=FILE`; relative to the working directory
    descriptor_set: Annotated[str, AfterValidator(_descriptor_file)]
    #: full service names (`pkg.Users`); empty = every service in the set
    services: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _services_exist(self) -> GrpcCompare:
        # a missing file is reported on its own key; the services are checked against its
        # contents only when it could be read
        if not os.path.isfile(self.descriptor_set):
            return self
        known = read_descriptor_set(self.descriptor_set).services
        for name in self.services:
            if name not in known:
                raise ValueError(
                    f"unknown service {name!r} in {self.descriptor_set} "
                    f"(it has: {', '.join(known) or 'no services'})"
                )
        return self


class ShadowCompare(_Model, frozen=True):
    """How one shadow's answers are compared with the primary's (`compare:` on a shadow)."""

    #: strict: all paths equal both ways; subset: the candidate may add paths; schema: same paths
    #: and JSON types, values may differ
    mode: Literal["strict", "subset", "schema"] = "strict"
    #: field paths (with wildcards) left out of the comparison, on top of global and route rules
    ignore: FieldPaths = Field(default_factory=list)
    #: array paths compared as multisets (order does not matter)
    unordered: FieldPaths = Field(default_factory=list)
    #: a backend running the primary's version; its answers measure noise (Diffy's secondary)
    secondary: str | None = None
    #: header names ignored for this shadow, on top of `compare.ignore_headers`
    ignore_headers: HeaderNames = Field(default_factory=list)
    #: capture cap per answer; a longer body is cut and compared as far as captured
    max_body: Size = 1024**2
    #: proto names for gRPC answers; replaces the route's and the global `grpc` for this shadow
    grpc: GrpcCompare | None = None


def _compare_flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(
        f"must be true, false or a mapping (mode, ignore, unordered, secondary, ...), got {value!r}"
    )


def _compare_kind(value: object) -> str:
    return "<settings>" if isinstance(value, dict | ShadowCompare) else "<flag>"


def _none_to_settings(value: object) -> object:
    """`compare:` with nothing under it means "compare with defaults", as for other blocks."""
    return {} if value is None else value


ShadowCompareField = Annotated[
    Annotated[bool, PlainValidator(_compare_flag), Tag("<flag>")]
    | Annotated[ShadowCompare, Tag("<settings>")],
    Discriminator(_compare_kind),
    BeforeValidator(_none_to_settings),
]


class RouteCompare(_Model, frozen=True):
    """Per-route comparison rules (`routes[].compare`), applied to every compared shadow."""

    ignore: FieldPaths = Field(default_factory=list)
    #: proto names for gRPC answers of this route's shadows (unless a shadow names its own)
    grpc: GrpcCompare | None = None


#: Headers that differ between any two servers or any two answers of one server, so comparing
#: them reports only noise. Each has a reason in docs/comparison.md. Not here on purpose:
#: etag, last-modified, set-cookie, cache-control, vary, content-type, content-encoding, location
#: (a change in them can break clients; with a `secondary`, random values cancel out as noise).
DEFAULT_IGNORE_HEADERS: tuple[str, ...] = (
    "date",
    "server",
    "x-request-id",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "age",
    "expires",
    "x-runtime",
    "x-response-time",
    "server-timing",
    "traceparent",
    "tracestate",
    "x-amzn-trace-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "via",
    "x-served-by",
    "x-cache",
    "x-cache-hits",
    "x-timer",
)


# The only place these defaults are written: code that needs them without a loaded config (the
# store's options, analysis) reads `CompareThresholds()`, which is frozen and so safe to share.
class CompareThresholds(_Model, frozen=True):
    """Diffy's rule for reporting a field: its difference rate must clearly exceed its noise.

    A field is reported only if raw > noise AND |raw-noise|/(raw+noise)*100 > relative AND
    |raw-noise|/compared*100 > absolute (raw, noise: counts of requests; compared: requests).
    """

    relative: Annotated[float, Field(ge=0)] = 20.0
    absolute: Annotated[float, Field(ge=0)] = 0.03


def _check_store(value: str) -> str:
    if not value.startswith(("sqlite:///", "postgresql://")):
        raise ValueError(f"must start with sqlite:/// or postgresql://, not {value!r}")
    return value


class CompareConfig(_Model, frozen=True):
    """Global comparison settings: where results go, global rules, noise thresholds, limits."""

    store: Annotated[str, AfterValidator(_check_store)] = "sqlite:///shadowlane.db"
    #: field paths ignored on every route and shadow
    ignore: FieldPaths = Field(default_factory=list)
    #: header names never compared (replaces the default list when given; see docs)
    ignore_headers: HeaderNames = Field(default_factory=lambda: list(DEFAULT_IGNORE_HEADERS))
    thresholds: Annotated[CompareThresholds, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=CompareThresholds
    )
    #: jobs waiting for the comparator; beyond it they are dropped (result `dropped`)
    queue: Annotated[Int, Field(ge=1)] = 256
    #: ... and the body bytes they may hold together (a job is never refused by an empty
    #: queue for its size alone)
    queue_bytes: Annotated[Size, Field(gt=0)] = 64 * 1024**2
    #: example pairs kept per (route, target, field), newest first
    examples_per_field: Annotated[Int, Field(ge=0)] = 5
    #: examples older than this are deleted (aggregates are kept)
    retention: Annotated[Duration, AfterValidator(_positive)] = 7 * 86400.0
    #: the comparator writes to the store at least this often ...
    flush_interval: Timeout = 1.0
    #: ... or as soon as this many results are waiting
    batch: Annotated[Int, Field(ge=1)] = 500
    #: share of wall time (0..1] the comparator may spend comparing; it holds the GIL meanwhile,
    #: so this bounds what comparisons can take from the event loop (past it, jobs drop)
    cpu_share: Annotated[float, Field(gt=0, le=1)] = 0.1
    #: comparison child processes (each compares one job at a time, off this process's GIL);
    #: 0 compares on a thread of the proxy's process instead (its parsing then holds the GIL)
    processes: Annotated[Int, Field(ge=0, le=64)] = 1
    #: how the comparison children are scheduled: "idle" (Linux SCHED_IDLE: they run only on
    #: CPU time nothing else wants, so waking up they never preempt the proxy; where there is
    #: no such policy, nice 19) or "normal" (the default policy, with `nice` added)
    priority: Literal["idle", "normal"] = "idle"
    #: added to the comparison children's nice value with `priority: normal`: with more, on a
    #: saturated machine they yield the CPU to the proxy (and comparisons drop, counted)
    nice: Annotated[Int, Field(ge=0, le=19)] = 0
    #: proto names for gRPC answers on every route (unless a route or shadow names its own)
    grpc: GrpcCompare | None = None
