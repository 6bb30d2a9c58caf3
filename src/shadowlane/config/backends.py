"""Backends: named groups of upstream endpoints, and the endpoint value built from each URL.

Backends are where the config meets the network, so endpoint URLs are taken apart here, once:
what leaves this module is an immutable `Endpoint` (scheme, host, port, all checked) rather than
text, and no later layer parses a URL or meets a path, a query or credentials in one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, PlainValidator, field_validator, model_validator

from shadowlane.config.base import _Model
from shadowlane.config.units import Int, Timeout


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


class BackendConfig(_Model, frozen=True):
    """A named group of interchangeable endpoints, used round robin."""

    endpoints: Annotated[list[EndpointField], Field(min_length=1)]
    timeout: Timeout = 30.0
    connect_timeout: Timeout = 5.0
    max_connections: Annotated[Int, Field(ge=1)] = 1024
    max_idle: Annotated[Int, Field(ge=0)] = 64
    ca_file: str | None = None
    verify: bool = True
    #: what the backend speaks: HTTP/1.1, HTTP/2 in cleartext (prior knowledge), or HTTP/2
    #: over TLS (ALPN h2); the scheme of the endpoints must agree
    protocol: Literal["http1", "h2c", "h2"] = "http1"

    @model_validator(mode="after")
    def _scheme_matches_protocol(self) -> BackendConfig:
        want = {"h2c": "http", "h2": "https"}.get(self.protocol)
        if want is not None:
            wrong = [str(ep) for ep in self.endpoints if ep.scheme != want]
            if wrong:
                tls = "TLS with ALPN h2" if want == "https" else "cleartext HTTP/2"
                raise ValueError(
                    f"protocol: {self.protocol} is {tls}, so endpoints must be {want}:// "
                    f"(not {', '.join(wrong)})"
                )
        return self

    @field_validator("endpoints", mode="before")
    @classmethod
    def _one_endpoint(cls, value: object) -> object:
        """`endpoints: http://a:1` (one string) is so common that it is accepted as a list."""
        return [value] if isinstance(value, str) else value
