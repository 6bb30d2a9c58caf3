"""Configuration: pydantic models loaded from YAML, with errors a person can act on.

The models are the contract every other layer codes against, so attribute names are fixed (see
docs/config.md). Validation happens in two passes: pydantic checks each field and each model on
its own (collecting every problem at once), then, only if that passed, cross-reference checks look
at the whole tree (backend names exist, route names are unique, listen addresses differ). Every
problem becomes one line `key.path: reason`, so `shadowlane check` can print them as they are.

Models are not frozen and do not validate assignment: runtime control (canary weights, shadow
percent) mutates them later and validates its own input first (see `routing.Route.set_weights`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Strict,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

__all__ = [
    "AdminConfig",
    "BackendConfig",
    "CompareConfig",
    "CompareThresholds",
    "Config",
    "ConfigError",
    "Duration",
    "Endpoint",
    "HeaderMutation",
    "LimitsConfig",
    "MatchConfig",
    "PathRewrite",
    "RouteCompare",
    "RouteConfig",
    "ShadowCompare",
    "ShadowConfig",
    "ShadowMatch",
    "Size",
    "WeightedBackend",
    "format_duration",
    "format_size",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_host_port",
    "parse_size",
    "summarize",
]


class ConfigError(Exception):
    """A config that cannot be used; `errors` holds one `key.path: reason` line per problem.

    All problems are collected before raising so a user fixes a file in one round, not one error
    per run.
    """

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


# ---------------------------------------------------------------------------------------------
# Scalar helper types: durations, sizes, names, host:port


# `d` exists for retention-like settings (`retention: 7d`); no weeks or months, whose length
# people disagree on.
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|d|h|m|s))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(value: object) -> float:
    """Turn `250ms`, `5s`, `1m`, `1.5s`, `1m30s`, `7d` or a bare number (seconds) into seconds.

    Booleans are refused even though Python treats them as ints: `timeout: yes` is a mistake.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {str(value).lower()} (use e.g. 250ms, 5s, 1m)")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative: {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            return float(text)
        if _DURATION_FULL.fullmatch(text):
            return sum(
                float(num) * _DURATION_UNITS[unit] for num, unit in _DURATION_PART.findall(text)
            )
    raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 5s, 1m)")


_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", re.IGNORECASE)


def parse_size(value: object) -> int:
    """Turn `512`, `10KiB`, `1MiB`, `1GiB` or `1KB` (= 1000) into bytes.

    Units are case-insensitive but the `i` matters: KiB is 1024, KB is 1000, as in IEC 80000-13.
    A size must come out as a whole number of bytes (`1.5KiB` yes, `1.1B` no).
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {str(value).lower()} (use e.g. 512, 64KiB, 1MiB)")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative: {value!r}")
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m:
            mult = _SIZE_UNITS[(m.group(2) or "b").lower()]
            number = m.group(1)
            if "." not in number:
                return int(number) * mult
            total = float(number) * mult
            if total.is_integer():
                return int(total)
            raise ValueError(f"not a whole number of bytes: {value!r}")
    raise ValueError(f"not a size: {value!r} (use e.g. 512, 64KiB, 1MiB)")


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be > 0")
    return value


#: seconds, from `250ms` / `5s` / `1m` / a bare number; never negative
Duration = Annotated[float, BeforeValidator(parse_duration)]
#: a Duration that must be > 0 (timeouts: zero would fail every request)
Timeout = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
#: bytes, from `512` / `64KiB` / `1MB`; never negative
Size = Annotated[int, BeforeValidator(parse_size)]
# Strict so that `max_connections: yes` (a YAML bool) is an error instead of 1.
Int = Annotated[int, Strict()]

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_name(value: str) -> str:
    """Route and backend names become metric labels and admin API path segments."""
    if not _NAME.fullmatch(value):
        raise ValueError(f"bad name {value!r}: use letters, digits and _ . - only")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


def parse_host_port(value: str) -> tuple[str, int]:
    """Split `host:port` / `[v6]:port` into a bind tuple; port 0 (ephemeral) is allowed.

    The host is required: binding every interface must be written out (`0.0.0.0:8080`), since an
    ingress that listens more widely than meant is a security problem, not a convenience.
    """
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"not host:port: {value!r} (IPv6 is written [::1]:8080)")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address: {host!r}") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"not host:port: {value!r} (e.g. 127.0.0.1:8080)")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets: {value!r} (e.g. [::1]:8080)")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad port in {value!r}: must be 0..65535")
    return host, int(port)


def _check_listen(value: str) -> str:
    parse_host_port(value)
    return value


Listen = Annotated[str, AfterValidator(_check_listen)]


def _none_to_empty(factory: Callable[[], object]) -> Callable[[object], object]:
    """Let `key:` with nothing under it (YAML null) mean "empty", as a commented-out block does."""

    def convert(value: object) -> object:
        return factory() if value is None else value

    return convert


# ---------------------------------------------------------------------------------------------
# Backends


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream address; the pool keys connections by it, so it is hashable and immutable."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        """`host:port` as sent in a Host header (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}"

    def __str__(self) -> str:
        return self.url


def _parse_endpoint(value: object) -> Endpoint:
    if isinstance(value, Endpoint):
        return value
    if not isinstance(value, str):
        raise ValueError(f"not a URL: {value!r} (want http://host:port)")
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError as exc:
        reason = str(exc)
        raise ValueError(f"not a URL: {value!r} ({reason[:1].lower()}{reason[1:]})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a URL: {value!r} (want http://host:port or https://host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"no path allowed in an endpoint: {value!r} (routes keep the path)")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"no user:password allowed in an endpoint: {value!r}")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return Endpoint(parts.scheme, parts.hostname, port)


EndpointField = Annotated[Endpoint, PlainValidator(_parse_endpoint)]


class _Model(BaseModel):
    # coerce_numbers_to_str: YAML reads `x-api-version: 2` as an int; a header value is text.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class BackendConfig(_Model):
    """A named group of interchangeable endpoints, used round robin."""

    endpoints: Annotated[list[EndpointField], Field(min_length=1)]
    timeout: Timeout = 30.0
    connect_timeout: Timeout = 5.0
    max_connections: Annotated[Int, Field(ge=1)] = 1024
    max_idle: Annotated[Int, Field(ge=0)] = 64
    ca_file: str | None = None
    verify: bool = True

    @field_validator("endpoints", mode="before")
    @classmethod
    def _one_endpoint(cls, value: object) -> object:
        """`endpoints: http://a:1` (one string) is so common that it is accepted as a list."""
        return [value] if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------
# Matching


def _upper_methods(value: object) -> object:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [v.upper() if isinstance(v, str) else v for v in value]
    return value


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


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


class MatchConfig(_Model):
    """Predicates of a route; all given ones must hold (AND). Empty matches every request."""

    host: Annotated[str | None, AfterValidator(_check_host)] = None
    path: PathStr = None
    path_prefix: PathStr = None
    path_regex: RegexStr = None
    methods: Methods = None
    headers: HeaderMap = None
    query: dict[str, str] | None = None


class ShadowMatch(_Model):
    """Extra conditions for sending a shadow copy, on top of the route's match."""

    methods: Methods = None
    path_prefix: PathStr = None
    headers: HeaderMap = None


# ---------------------------------------------------------------------------------------------
# Shadows

#: headers the shadow copy's framing, Host handling and loop detection depend on
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "x-shadowlane-shadow"}
)


def _check_mutable_header(name: str) -> None:
    if name in _RESERVED_HEADERS:
        hint = "use host:/host_suffix:" if name == "host" else "shadowlane manages it"
        raise ValueError(f"header {name!r} cannot be changed here ({hint})")
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"not a header name: {name!r}")


class HeaderMutation(_Model):
    """Headers to set on / remove from a shadow copy (the primary request is never touched)."""

    set: Annotated[dict[str, str], BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=dict
    )
    remove: Annotated[list[str], BeforeValidator(_none_to_empty(list))] = Field(
        default_factory=list
    )

    @field_validator("set", mode="before")
    @classmethod
    def _lower_set(cls, value: object) -> object:
        return _lower_header_names(value)

    @field_validator("remove", mode="before")
    @classmethod
    def _lower_remove(cls, value: object) -> object:
        if isinstance(value, list):
            return [v.lower() if isinstance(v, str) else v for v in value]
        return value

    @field_validator("set")
    @classmethod
    def _check_set(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            _check_mutable_header(name)
        return value

    @field_validator("remove")
    @classmethod
    def _check_remove(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_mutable_header(name)
        return value


_GROUP_REF = re.compile(r"\\(?:(\d+)|g<([^>]*)>)")


class PathRewrite(_Model):
    """`re.sub(regex, replacement, path)` on the shadow copy's path (query kept as is)."""

    regex: str
    replacement: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        _compile_regex(value)
        return value

    @model_validator(mode="after")
    def _groups_exist(self) -> PathRewrite:
        """A reference to a missing group would only fail on the first matching request."""
        pattern = re.compile(self.regex)
        for num, name in _GROUP_REF.findall(self.replacement):
            ref = num or name
            if ref.isdigit():
                if int(ref) > pattern.groups:
                    raise ValueError(f"replacement refers to group {ref}, regex has no such group")
            elif ref not in pattern.groupindex:
                raise ValueError(f"replacement refers to group {ref!r}, regex has no such group")
        return self


def _key_spec(value: str, kinds: Iterable[str], bare: Iterable[str], what: str) -> str:
    """Validate `kind:NAME` / bare keywords; header names are lower-cased (case-insensitive)."""
    if value in bare:
        return value
    kind, sep, name = value.partition(":")
    if sep and kind in kinds and name:
        return f"{kind}:{name.lower()}" if kind == "header" else value
    raise ValueError(f"must be {what}, not {value!r}")


def _check_sample_by(value: str | None) -> str | None:
    if value is None:
        return None
    return _key_spec(
        value,
        ("header", "cookie", "query"),
        ("client_ip",),
        "header:NAME, cookie:NAME, query:NAME or client_ip",
    )


def _check_ordered_by(value: str | None) -> str | None:
    if value is None:
        return None
    return _key_spec(value, ("header", "query"), ("path",), "path, header:NAME or query:NAME")


def _split_key(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    kind, _, name = value.partition(":")
    return kind, name


def _parse_percent(value: object) -> object:
    """Accept `10%` as well as `10`: people write percent signs in percent fields."""
    if isinstance(value, bool):
        raise ValueError("must be a number 0..100")
    if isinstance(value, str) and value.strip().endswith("%"):
        return value.strip()[:-1]
    return value


def _check_percent(value: float) -> float:
    if not 0.0 <= value <= 100.0:
        raise ValueError("must be 0..100")
    return value


Percent = Annotated[float, BeforeValidator(_parse_percent), AfterValidator(_check_percent)]


def _check_host_suffix(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9.-]+", value):
        raise ValueError(f"not a host name suffix: {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Comparison settings (see docs/comparison.md for what the engine does with them)

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
    if root not in ("status", "headers", "body", "**", "*"):
        raise ValueError(
            f"bad field path {value!r}: must start with status, headers, body, * or **"
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


class ShadowCompare(_Model):
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


class RouteCompare(_Model):
    """Per-route comparison rules (`routes[].compare`), applied to every compared shadow."""

    ignore: FieldPaths = Field(default_factory=list)


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


class CompareThresholds(_Model):
    """Diffy's rule for reporting a field: its difference rate must clearly exceed its noise.

    A field is reported only if raw > noise AND |raw-noise|/(raw+noise)*100 > relative AND
    |raw-noise|/compared*100 > absolute (raw, noise: counts of requests; compared: requests).
    """

    relative: Annotated[float, Field(ge=0)] = 20.0
    absolute: Annotated[float, Field(ge=0)] = 0.03


class ShadowConfig(_Model):
    """One shadow target of a route: which copies go where, changed how, under which limits."""

    backend: str
    percent: Percent = 100.0
    sample_by: Annotated[str | None, AfterValidator(_check_sample_by)] = None
    match: ShadowMatch | None = None
    host_suffix: Annotated[str, AfterValidator(_check_host_suffix)] = "-shadow"
    host: str | None = None
    headers: Annotated[HeaderMutation, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=HeaderMutation
    )
    rewrite_path: PathRewrite | None = None
    send: Literal["with_request", "after_response"] = "with_request"
    only_if_primary: Literal["2xx"] | None = None
    ordered_by: Annotated[str | None, AfterValidator(_check_ordered_by)] = None
    timeout: Timeout = 5.0
    max_in_flight: Annotated[Int, Field(ge=1)] = 64
    queue: Annotated[Int, Field(ge=0)] = 1024
    max_body: Size = 1024**2
    compare: ShadowCompareField = False

    @model_validator(mode="after")
    def _only_if_primary_implies_after_response(self) -> ShadowConfig:
        """The primary's status is known only after it answers, so the condition moves the send.

        Writing `send: with_request` explicitly next to it is a contradiction, and an error.
        """
        if self.only_if_primary is not None and self.send == "with_request":
            if "send" in self.model_fields_set:
                raise ValueError(
                    "only_if_primary needs send: after_response (leave send out to imply it)"
                )
            self.send = "after_response"
        return self

    @property
    def sample_key(self) -> tuple[str, str] | None:
        """`sample_by` split as (kind, name): ("header", "x-user-id"), ("client_ip", "")."""
        return _split_key(self.sample_by)

    @property
    def order_key(self) -> tuple[str, str] | None:
        """`ordered_by` split as (kind, name): ("path", ""), ("query", "account")."""
        return _split_key(self.ordered_by)

    @property
    def compare_enabled(self) -> ShadowCompare | None:
        """The resolved compare settings (`true` = defaults), or None when not comparing."""
        if isinstance(self.compare, ShadowCompare):
            return self.compare
        return ShadowCompare() if self.compare else None


# ---------------------------------------------------------------------------------------------
# Routes


class WeightedBackend(_Model):
    """One leg of a weighted split; weight 0 keeps it listed (ready to flip) but idle."""

    backend: str
    weight: Annotated[Int, Field(ge=0)]


class RouteConfig(_Model):
    """Match -> primary backend(s), plus shadows. First matching route wins, in file order."""

    name: Name
    match: Annotated[MatchConfig, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=MatchConfig
    )
    backend: str | None = None
    backends: Annotated[list[WeightedBackend], Field(min_length=1)] | None = None
    max_body: Size | None = None
    shadows: Annotated[list[ShadowConfig], BeforeValidator(_none_to_empty(list))] = Field(
        default_factory=list
    )
    compare: Annotated[RouteCompare | None, BeforeValidator(_none_to_empty(dict))] = None

    @field_validator("backends")
    @classmethod
    def _weights_usable(cls, value: list[WeightedBackend] | None) -> list[WeightedBackend] | None:
        if value is None:
            return None
        if all(w.weight == 0 for w in value):
            raise ValueError("weights may not all be 0")
        seen: set[str] = set()
        for w in value:
            if w.backend in seen:
                raise ValueError(f"backend {w.backend!r} listed twice")
            seen.add(w.backend)
        return value

    @model_validator(mode="after")
    def _one_backend_form(self) -> RouteConfig:
        if self.backend is not None and self.backends is not None:
            raise ValueError("set either backend or backends, not both")
        if self.backend is None and self.backends is None:
            raise ValueError("needs backend or backends")
        return self

    @property
    def backend_names(self) -> list[str]:
        """Primary backend names in config order (one for `backend`, all legs for `backends`)."""
        if self.backends is not None:
            return [w.backend for w in self.backends]
        return [self.backend] if self.backend is not None else []


# ---------------------------------------------------------------------------------------------
# Top level


def _check_token_env(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"not an environment variable name: {value!r}")
    return value


class AdminConfig(_Model):
    """The admin server. The token comes from the environment so it never sits in the file."""

    listen: Listen = "127.0.0.1:9901"
    token_env: Annotated[str | None, AfterValidator(_check_token_env)] = None

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


class LimitsConfig(_Model):
    """Protections of the downstream side against slow or oversized clients."""

    max_header_size: Annotated[Size, Field(gt=0)] = 64 * 1024
    header_timeout: Timeout = 10.0
    idle_timeout: Timeout = 60.0
    max_body: Size = 1024**3
    drain_timeout: Duration = 30.0


def _readable_file(value: str) -> str:
    if not os.path.isfile(value):
        raise ValueError(f"no such file: {value}")
    return value


ReadableFile = Annotated[str, AfterValidator(_readable_file)]


class TlsConfig(_Model):
    """TLS on the listener. The files are read at start and on reload."""

    cert: ReadableFile
    key: ReadableFile
    #: CA bundle to verify client certificates with; when set, clients must present one
    client_ca: ReadableFile | None = None


def _check_store(value: str) -> str:
    if not value.startswith(("sqlite:///", "postgresql://")):
        raise ValueError(f"must start with sqlite:/// or postgresql://, not {value!r}")
    return value


class CompareConfig(_Model):
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
    queue: Annotated[Int, Field(ge=1)] = 1024
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
    cpu_share: Annotated[float, Field(gt=0, le=1)] = 0.25


def _parse_access_log(value: object) -> bool | str:
    """One key for "off / stdout / file" keeps the common cases one word long."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError("must be true, false, '-' (stdout) or a file path")


class Config(_Model):
    """The whole file. Cross-reference rules live in `_cross_check`, run after this validates."""

    listen: Listen = "127.0.0.1:8080"
    tls: TlsConfig | None = None
    admin: Annotated[AdminConfig, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=AdminConfig
    )
    limits: Annotated[LimitsConfig, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=LimitsConfig
    )
    access_log: Annotated[bool | str, PlainValidator(_parse_access_log)] = False
    backends: Annotated[dict[Name, BackendConfig], Field(min_length=1)]
    routes: Annotated[list[RouteConfig], Field(min_length=1)]
    compare: Annotated[CompareConfig, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=CompareConfig
    )

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


# ---------------------------------------------------------------------------------------------
# Loading


#: a key path as pydantic reports it: ('routes', 0, 'shadows', 1, 'percent')
Loc = tuple[int | str, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML silently keeps the last one otherwise."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it properly
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {first + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(exc: yaml.YAMLError, source: str) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if mark is not None:
            return f"{source}:{mark.line + 1}:{mark.column + 1}: {problem}"
        return f"{source}: {problem}"
    return f"{source}: {exc}"


def _loc_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]" or part.startswith("<"):
            # dict-key errors: the key itself is already the last path segment; "<...>" are
            # the tags of tagged unions (`compare: true` vs a mapping), not keys the user wrote
            continue
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _type_name(value: object) -> str:
    if value is None:
        return "nothing (empty value)"
    if isinstance(value, bool):
        return f"{str(value).lower()}, a boolean; quote it to make it text"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


_TYPE_WORDS = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def _reword(err: ErrorDetails) -> str:
    """Short, actionable wording for each pydantic error type the models can produce."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in _TYPE_WORDS:
        return f"{_TYPE_WORDS[kind]}, got {_type_name(err['input'])}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', '?')}, got {err['input']!r}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}"
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"]))
        return msg
    msg = err["msg"]
    return msg[:1].lower() + msg[1:]


def _cross_check(cfg: Config) -> list[str]:
    """Whole-tree rules that no single model can see."""
    errors: list[str] = []
    known = list(cfg.backends)
    known_text = ", ".join(known)

    def ref(path: str, name: str) -> None:
        if name not in cfg.backends:
            errors.append(f"{path}: unknown backend {name!r} (known: {known_text})")

    first_seen: dict[str, int] = {}
    for i, route in enumerate(cfg.routes):
        if route.name in first_seen:
            errors.append(
                f"routes[{i}].name: duplicate route name {route.name!r} "
                f"(also routes[{first_seen[route.name]}])"
            )
        else:
            first_seen[route.name] = i
        if route.backend is not None:
            ref(f"routes[{i}].backend", route.backend)
        for j, leg in enumerate(route.backends or ()):
            ref(f"routes[{i}].backends[{j}].backend", leg.backend)
        shadowed: dict[str, int] = {}
        for j, shadow in enumerate(route.shadows):
            ref(f"routes[{i}].shadows[{j}].backend", shadow.backend)
            if shadow.backend in shadowed:
                # outcomes, latencies and comparisons are kept per (route, target): two lanes
                # under one name would add up into one series and one comparison row
                errors.append(
                    f"routes[{i}].shadows[{j}].backend: {shadow.backend!r} is already the target "
                    f"of routes[{i}].shadows[{shadowed[shadow.backend]}]; to send two copies, "
                    "declare a second backend name with the same endpoints"
                )
            else:
                shadowed[shadow.backend] = j
            opts = shadow.compare_enabled
            if opts is not None and opts.secondary is not None:
                ref(f"routes[{i}].shadows[{j}].compare.secondary", opts.secondary)

    listen, admin = cfg.listen_addr, cfg.admin.listen_addr
    if listen == admin and listen[1] != 0:
        errors.append(f"admin.listen: same address as listen ({cfg.listen})")
    return errors


def _positions(node: yaml.Node, path: Loc, out: dict[Loc, tuple[int, int]]) -> None:
    """Map each key path to where it starts in the file, to report errors in file order."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                sub = (*path, key_node.value)
                out[sub] = (key_node.start_mark.line, key_node.start_mark.column)
                _positions(value_node, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = (*path, i)
            out[sub] = (item.start_mark.line, item.start_mark.column)
            _positions(item, sub, out)


def _position_of(loc: Loc, positions: dict[Loc, tuple[int, int]]) -> tuple[int, int]:
    parts = tuple(p for p in loc if p != "[key]" and not str(p).startswith("<"))
    for end in range(len(parts), 0, -1):
        pos = positions.get(parts[:end])
        if pos is not None:
            return pos
    return (0, 0)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse YAML text into a validated Config, or raise ConfigError with every problem found.

    Problems are listed in the order their keys appear in the file (pydantic would list a
    model's fields first and its unknown keys last), so the list reads top to bottom.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc, source)]) from None
    finally:
        loader.dispose()
    if data is None or node is None:
        raise ConfigError([f"{source}: empty config (needs at least backends and routes)"])
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{source}: top level must be a mapping of keys, got {_type_name(data)}"]
        )
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        positions: dict[Loc, tuple[int, int]] = {}
        _positions(node, (), positions)
        found = sorted(
            exc.errors(include_url=False), key=lambda e: _position_of(e["loc"], positions)
        )
        raise ConfigError([f"{_loc_path(e['loc'])}: {_reword(e)}" for e in found]) from None
    errors = _cross_check(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and parse a config file; errors about YAML syntax carry `file:line:col`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc.reason}"]) from None
    return parse_config(text, str(path))


# ---------------------------------------------------------------------------------------------
# Summary


def format_duration(seconds: float) -> str:
    """Inverse of parse_duration for display: 0.25 -> 250ms, 90 -> 90s, 120 -> 2m."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds % 86400 == 0:
        return f"{seconds / 86400:g}d"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """Inverse of parse_size for display: the largest unit that divides exactly."""
    for unit, mult in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % mult == 0:
            return f"{size // mult}{unit}"
    for unit, mult in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if size and size % mult == 0:
            return f"{size // mult}{unit}"
    return f"{size}B"


def _describe_match(m: MatchConfig | ShadowMatch) -> str:
    parts: list[str] = []
    for key in ("host", "path", "path_prefix", "path_regex"):
        value = getattr(m, key, None)
        if value is not None:
            parts.append(f"{key}={value}")
    if m.methods:
        parts.append("methods=" + ",".join(m.methods))
    if m.headers:
        parts.extend(f"header {k}={v}" for k, v in m.headers.items())
    query = getattr(m, "query", None)
    if query:
        parts.extend(f"query {k}={v}" for k, v in query.items())
    return " ".join(parts) or "everything"


def _describe_shadow(s: ShadowConfig) -> str:
    """One line per shadow; limits are shown only where they differ from the defaults."""
    parts = [f"{s.percent:g}%"]
    if s.sample_by:
        parts.append(f"by {s.sample_by}")
    if s.match is not None:
        parts.append(f"if {_describe_match(s.match)}")
    if s.only_if_primary:
        parts.append(f"after primary {s.only_if_primary}")
    elif s.send != "with_request":
        parts.append(f"send {s.send}")
    if s.ordered_by:
        parts.append(f"ordered by {s.ordered_by}")
    if s.host is not None:
        parts.append(f"host {s.host}")
    elif s.host_suffix != "-shadow":
        parts.append(f"host suffix {s.host_suffix!r}")
    if s.headers.set:
        parts.append("set " + ",".join(s.headers.set))
    if s.headers.remove:
        parts.append("remove " + ",".join(s.headers.remove))
    if s.rewrite_path is not None:
        parts.append(f"rewrite {s.rewrite_path.regex} -> {s.rewrite_path.replacement}")
    defaults = ShadowConfig.model_fields
    if s.timeout != defaults["timeout"].default:
        parts.append(f"timeout {format_duration(s.timeout)}")
    if s.max_in_flight != defaults["max_in_flight"].default:
        parts.append(f"in flight {s.max_in_flight}")
    if s.queue != defaults["queue"].default:
        parts.append(f"queue {s.queue}")
    if s.max_body != defaults["max_body"].default:
        parts.append(f"body <= {format_size(s.max_body)}")
    opts = s.compare_enabled
    if opts is not None:
        how: list[str] = [opts.mode]
        if opts.secondary:
            how.append(f"noise from {opts.secondary}")
        if opts.ignore:
            how.append(f"{len(opts.ignore)} ignore rules")
        parts.append("compare " + ", ".join(how))
    return f"shadow -> {s.backend}  " + ", ".join(parts)


def summarize(cfg: Config) -> str:
    """What `shadowlane check` prints on success: enough to confirm the file says what you meant."""
    lim = cfg.limits
    admin = cfg.admin.listen + (
        f" (token from ${cfg.admin.token_env})" if cfg.admin.token_env else ""
    )
    if cfg.access_log is False:
        access = "off"
    elif cfg.access_log is True or cfg.access_log == "-":
        access = "stdout (JSON lines)"
    else:
        access = f"{cfg.access_log} (JSON lines)"
    lines = [
        f"listen      {cfg.listen}",
        f"admin       {admin}",
        f"limits      headers <= {format_size(lim.max_header_size)} in "
        f"{format_duration(lim.header_timeout)}, idle {format_duration(lim.idle_timeout)}, "
        f"body <= {format_size(lim.max_body)}, drain {format_duration(lim.drain_timeout)}",
        f"access log  {access}",
        f"compare     {cfg.compare.store} (queue {cfg.compare.queue}, examples "
        f"{cfg.compare.examples_per_field}/field for {format_duration(cfg.compare.retention)})",
        f"backends ({len(cfg.backends)})",
    ]
    width = max(len(n) for n in cfg.backends)
    for name, b in cfg.backends.items():
        eps = ", ".join(e.url for e in b.endpoints)
        lines.append(
            f"  {name:<{width}}  {eps}  (timeout {format_duration(b.timeout)}, "
            f"max {b.max_connections} conns/endpoint)"
        )
    lines.append(f"routes ({len(cfg.routes)}, first match wins)")
    for route in cfg.routes:
        lines.append(f"  {route.name}: {_describe_match(route.match)}")
        if route.backends is not None:
            total = sum(w.weight for w in route.backends)
            legs = ", ".join(
                f"{w.backend} {w.weight} ({100 * w.weight / total:.0f}%)" for w in route.backends
            )
            lines.append(f"    -> {legs}")
        else:
            lines.append(f"    -> {route.backend}")
        if route.max_body is not None:
            lines.append(f"    body <= {format_size(route.max_body)}")
        lines.extend(f"    {_describe_shadow(s)}" for s in route.shadows)
    return "\n".join(lines)
