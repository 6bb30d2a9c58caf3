"""The whole file: listener, TLS, admin server, downstream limits, and the sections below them.

`Config` is the root every importer, the loader and the app code against; the sections that
belong to no route or backend (admin, limits, TLS, access log) sit with it. Checks that need
the whole tree (references between sections) are not model rules; `loading` runs them once
this validates.
"""

from __future__ import annotations

import os
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, PlainValidator, model_validator

from shadowlane.config.backends import BackendConfig
from shadowlane.config.base import _Model, _none_to_empty
from shadowlane.config.comparison import CompareConfig
from shadowlane.config.migrations import MigrationConfig
from shadowlane.config.routes import RouteConfig
from shadowlane.config.units import Duration, Int, Listen, Name, Size, Timeout, parse_host_port


def _check_token_env(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"not an environment variable name: {value!r}")
    return value


class AdminConfig(_Model, frozen=True):
    """The admin server. The token comes from the environment so it never sits in the file."""

    listen: Listen = "127.0.0.1:9901"
    token_env: Annotated[str | None, AfterValidator(_check_token_env)] = None
    #: how often a probe task measures the event loop's wake-up delay
    #: (`shadowlane_loop_lag_seconds`); 0 turns it off
    loop_lag_probe: Duration = 0.1

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


class Watermarks(_Model, frozen=True):
    """Two levels of one resource: past `shed_shadows` shadow work is shed, past `refuse` new
    requests get 503. Either may be left out (off)."""

    shed_shadows: Annotated[int, Field(ge=0)] = 0
    refuse: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _ordered(self) -> Watermarks:
        if self.shed_shadows and self.refuse and self.shed_shadows > self.refuse:
            raise ValueError("shed_shadows must not be above refuse (shadows are shed first)")
        return self


class SizeWatermarks(Watermarks, frozen=True):
    """Watermarks in bytes (`768MiB`)."""

    shed_shadows: Annotated[Size, Field(ge=0)] = 0
    refuse: Annotated[Size, Field(ge=0)] = 0


class HeapReleaseConfig(_Model, frozen=True):
    """Handing the allocator's free pages back to the system (glibc's `malloc_trim`), so that
    resident memory, and the `rss` watermarks read from it, follow what is in use rather than
    the highest it ever was (Envoy's `shrink_heap` and background release)."""

    #: how often the allocator's free memory is looked at; 0 turns the release off
    interval: Annotated[Duration, Field(ge=0)] = 1.0
    #: a release runs when at least this much freed memory stayed resident since the last
    min_free: Annotated[Size, Field(ge=0)] = 16 * 1024 * 1024


class OverloadConfig(_Model, frozen=True):
    """The overload manager (Envoy's idea): watermarks on this process's resident memory and
    on the requests it has in flight. Off unless a watermark is set. The heap release is on
    by default: it is what keeps the memory watermark meaningful after a burst."""

    rss: Annotated[SizeWatermarks, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=SizeWatermarks
    )
    in_flight: Annotated[Watermarks, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=Watermarks
    )
    #: the `Retry-After` of a refused request, whole seconds (rounded up)
    retry_after: Timeout = 1.0
    heap_release: Annotated[HeapReleaseConfig, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=HeapReleaseConfig
    )


class LimitsConfig(_Model, frozen=True):
    """Protections of the downstream side against slow, greedy or oversized clients."""

    max_header_size: Annotated[Size, Field(gt=0)] = 64 * 1024
    header_timeout: Timeout = 10.0
    idle_timeout: Timeout = 60.0
    max_body: Size = 1024**3
    drain_timeout: Duration = 30.0
    #: open client connections per worker; past it a new one is closed at accept (0: no cap)
    max_connections: Annotated[int, Field(ge=0)] = 0
    #: file descriptors kept free: a connection accepted when fewer are left is closed at once
    #: (counted), so upstream connects and files never meet EMFILE
    fd_reserve: Annotated[int, Field(ge=0)] = 64
    #: requests served on one client connection; the last is answered `Connection: close`
    max_requests_per_connection: Annotated[int, Field(ge=0)] = 0
    #: a request body must average this many bytes/s over each `body_rate_window` (0: off)
    min_body_rate: Annotated[Size, Field(ge=0)] = 1024
    body_rate_window: Timeout = 30.0
    overload: Annotated[OverloadConfig, BeforeValidator(_none_to_empty(dict))] = Field(
        default_factory=OverloadConfig
    )
    #: on SIGTERM (and for tunnels a reload leaves without a route), how long upgraded
    #: connections may go on before they are closed: 5 s, Envoy's and Istio's drain default
    tunnel_drain_timeout: Duration = 5.0
    #: HTTP/2 streams one client connection may have open at once (nginx's default)
    max_concurrent_streams: Annotated[Int, Field(ge=1, le=10000)] = 128


def _readable_file(value: str) -> str:
    if not os.path.isfile(value):
        raise ValueError(f"no such file: {value}")
    return value


ReadableFile = Annotated[str, AfterValidator(_readable_file)]


class TlsConfig(_Model, frozen=True):
    """TLS on the listener. The files are read at start and on reload."""

    cert: ReadableFile
    key: ReadableFile
    #: CA bundle to verify client certificates with; when set, clients must present one
    client_ca: ReadableFile | None = None


def _parse_access_log(value: object) -> bool | str:
    """One key for "off / stdout / file" keeps the common cases one word long."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError("must be true, false, '-' (stdout) or a file path")


class Config(_Model, frozen=True):
    """The whole file. Cross-reference rules live in `_cross_check`, run after this validates."""

    listen: Listen = "127.0.0.1:8080"
    #: HTTP/2 from clients too: h2 by ALPN on TLS, h2c with prior knowledge on cleartext
    listen_http2: bool = False
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
    migrations: Annotated[list[MigrationConfig], BeforeValidator(_none_to_empty(list))] = Field(
        default_factory=list
    )

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_host_port(self.listen)
