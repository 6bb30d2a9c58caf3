"""Routes: a match, the primary backend or a weighted split of several, and the shadows.

The rules that make a route usable on its own (one backend form, weights that can send traffic
somewhere, each leg named once) are model rules here; whether the named backends exist is a
whole-file question, checked in `loading`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from shadowlane.config.base import _Model, _none_to_empty
from shadowlane.config.comparison import RouteCompare
from shadowlane.config.matching import MatchConfig
from shadowlane.config.recording import RecordConfig
from shadowlane.config.shadows import ShadowConfig
from shadowlane.config.units import _TOKEN, Int, Name, Size, Timeout


def _check_upgrades(value: list[str]) -> list[str]:
    """Protocol names a route tunnels after a `101` (RFC 9110 7.8 tokens, lower-cased)."""
    out: list[str] = []
    for name in value:
        name = name.strip().lower()
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"not a protocol name: {name!r}")
        if name == "h2c":
            raise ValueError("h2c is HTTP/2, not a tunnel: see listen_http2")
        if name in out:
            raise ValueError(f"{name!r} listed twice")
        out.append(name)
    return out


class WeightedBackend(_Model, frozen=True):
    """One leg of a weighted split; weight 0 keeps it listed (ready to flip) but idle."""

    backend: str
    weight: Annotated[Int, Field(ge=0)]


class RouteConfig(_Model, frozen=True):
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
    #: record this route's requests (and, with `answers`, the primary's answers)
    record: Annotated[RecordConfig | None, BeforeValidator(_none_to_empty(dict))] = None
    #: protocols an `Upgrade` request may switch to on this route (a `101`, then a byte
    #: tunnel); others are served as plain HTTP. WebSocket by default, as Traefik, Istio,
    #: HAProxy and the Kubernetes nginx ingress do (docs/decisions.md)
    upgrades: Annotated[
        list[str], BeforeValidator(_none_to_empty(list)), AfterValidator(_check_upgrades)
    ] = Field(default_factory=lambda: ["websocket"])
    #: a tunnel with no byte either way for this long is closed (Envoy's stream idle timeout)
    tunnel_idle_timeout: Timeout = 300.0

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
