"""Shadows: which copies of a route's requests go to a target, changed how, under which limits.

Everything a shadow copy may differ in from the primary request is decided here, before any
request exists: headers that framing, Host handling and loop detection depend on cannot be
changed, a rewrite's group references must exist, and sampling and ordering keys must name
something a request has. `shadow.mutation` and `shadow.dispatcher` then apply the settings
without checking them again on the hot path.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from shadowlane.config.base import _Model, _none_to_empty
from shadowlane.config.comparison import ShadowCompare, ShadowCompareField
from shadowlane.config.matching import ShadowMatch, _compile_regex, _lower_header_names
from shadowlane.config.recording import RecordConfig
from shadowlane.config.sampling import Percent, _check_sample_by, _key_spec
from shadowlane.config.units import _TOKEN, Int, Name, Size, Timeout

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


#: what a field value may not hold (RFC 9110 5.5): a CR or LF would end the header early and
#: let the value write a header of its own
_BAD_VALUE = re.compile(r"[\r\n\x00]")


def _check_header_value(name: str, value: str) -> None:
    if _BAD_VALUE.search(value):
        raise ValueError(f"header {name!r}: a value may not hold CR, LF or NUL")


class HeaderMutation(_Model, frozen=True):
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
        for name, text in value.items():
            _check_mutable_header(name)
            _check_header_value(name, text)
        return value

    @field_validator("remove")
    @classmethod
    def _check_remove(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_mutable_header(name)
        return value


_GROUP_REF = re.compile(r"\\(?:(\d+)|g<([^>]*)>)")


class PathRewrite(_Model, frozen=True):
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


def _check_ordered_by(value: str | None) -> str | None:
    if value is None:
        return None
    return _key_spec(value, ("header", "query"), ("path",), "path, header:NAME or query:NAME")


def _check_order_key(value: str) -> str:
    """One key extractor of `order.keys`: the `ordered_by` forms plus regex captures of the path
    and a JSON pointer into the body; checked here so a bad one never reaches a request."""
    kind, sep, name = value.partition(":")
    if sep and kind == "path_regex" and name:
        _compile_regex(name)
        return value
    if sep and kind == "json":
        if not name.startswith("/"):
            raise ValueError(f"json:POINTER needs a JSON pointer starting with '/', not {name!r}")
        return value
    return _key_spec(
        value,
        ("header", "query"),
        ("path",),
        "path, header:NAME, query:NAME, path_regex:RE or json:/POINTER",
    )


OrderKeySpec = Annotated[str, AfterValidator(_check_order_key)]


class OrderConfig(_Model, frozen=True):
    """Ordering of a shadow's copies: the scope they share with other shadows, and their keys.

    Copies of one scope (by name, per target backend) that share a key are sent one after the
    other, in the order their primaries answered; copies with disjoint keys go in parallel.
    """

    #: shadows naming the same scope and target are ordered together, across routes; without a
    #: name the shadow has a scope of its own (what `ordered_by` always was)
    scope: Name | None = None
    #: `elasticsearch` (documents, `_bulk` actions, index-level barriers), or a list of key
    #: extractors whose keys together are the copy's key set
    keys: Literal["elasticsearch"] | Annotated[list[OrderKeySpec], Field(min_length=1)]
    #: every copy of this shadow is a barrier for its whole scope (templates, cluster settings)
    barrier: bool = False


def _split_key(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    kind, _, name = value.partition(":")
    return kind, name


def _check_host_suffix(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9.-]+", value):
        raise ValueError(f"not a host name suffix: {value!r}")
    return value


class ShadowConfig(_Model, frozen=True):
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
    order: OrderConfig | None = None
    ids_from_primary: Literal["elasticsearch"] | None = None
    timeout: Timeout = 5.0
    max_in_flight: Annotated[Int, Field(ge=1)] = 64
    queue: Annotated[Int, Field(ge=0)] = 1024
    max_body: Size = 1024**2
    #: a body over max_body is streamed to this shadow in step with the primary (never kept
    #: whole), rather than skipped; the copy is aborted when the shadow falls behind
    stream_body: bool = False
    compare: ShadowCompareField = False
    #: record the copies sent to this shadow (and, with `answers`, its answers)
    record: Annotated[RecordConfig | None, BeforeValidator(_none_to_empty(dict))] = None
    #: an `Upgrade` request (WebSocket) is never tunnelled to a shadow: `skip` counts it
    #: `skipped_upgrade`; `handshake` sends the shadow the handshake alone and closes its `101`
    upgrades: Literal["skip", "handshake"] = "skip"

    @model_validator(mode="before")
    @classmethod
    def _only_if_primary_implies_after_response(cls, data: object) -> object:
        """The primary's status is known only after it answers, so the condition moves the send.

        Filled in as input, before validation, rather than assigned to the built model: the
        result is the same (`send` counts as given), and the model is never written.
        """
        if (
            isinstance(data, dict)
            and data.get("only_if_primary") is not None
            and "send" not in data
        ):
            return {**data, "send": "after_response"}
        return data

    @model_validator(mode="after")
    def _one_ordering_form(self) -> ShadowConfig:
        if self.ordered_by is not None and self.order is not None:
            raise ValueError(
                "set either ordered_by or order, not both (ordered_by: K is order: {keys: [K]})"
            )
        sent_with_request = "send" in self.model_fields_set and self.send == "with_request"
        if self.ids_from_primary is not None and sent_with_request:
            raise ValueError(
                "ids_from_primary needs the primary's answer: it cannot be "
                "combined with send: with_request"
            )
        return self

    @model_validator(mode="after")
    def _only_if_primary_needs_after_response(self) -> ShadowConfig:
        """Writing `send: with_request` explicitly next to only_if_primary is a contradiction."""
        if self.only_if_primary is not None and self.send == "with_request":
            raise ValueError(
                "only_if_primary needs send: after_response (leave send out to imply it)"
            )
        return self

    @property
    def sample_key(self) -> tuple[str, str] | None:
        """`sample_by` split as (kind, name): ("header", "x-user-id"), ("client_ip", "")."""
        return _split_key(self.sample_by)

    @property
    def ordering(self) -> OrderConfig | None:
        """The resolved ordering: `order`, or `ordered_by: K` as a one-key scope of its own."""
        if self.order is not None:
            return self.order
        if self.ordered_by is not None:
            return OrderConfig(keys=[self.ordered_by])
        return None

    @property
    def keeps_ledger(self) -> bool:
        """Copies go through the write steps (shadow/writes.py) and may diverge in a way the
        divergence ledger records: they are ordered, or rebuilt from the primary's answer."""
        return self.ordering is not None or self.ids_from_primary is not None

    @property
    def waits_for_primary(self) -> bool:
        """Copies go after the primary answered: asked for, ordered (the order is the order of
        the primary's answers), or rewritten from the primary's answer."""
        return self.send == "after_response" or self.keeps_ledger

    @property
    def compare_enabled(self) -> ShadowCompare | None:
        """The resolved compare settings (`true` = defaults), or None when not comparing."""
        if isinstance(self.compare, ShadowCompare):
            return self.compare
        return ShadowCompare() if self.compare else None
